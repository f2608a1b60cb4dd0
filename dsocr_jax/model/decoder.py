"""DeepSeek3B-MoE-A570M decoder (spec 3): embeddings, 12 pre-norm layers (layer 0 dense, MoE after), lm_head."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dsocr_jax.config import DecoderConfig
from dsocr_jax.model.attention import Attention, LayerCache
from dsocr_jax.model.layers import Dense, Embed, RMSNorm, SwiGLU
from dsocr_jax.model.moe import MoE, RouterInfo


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: DecoderConfig, layer: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.self_attn = Attention(cfg, **kw)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype,
                                            rngs=rngs)
    self.is_moe = cfg.is_moe_layer(layer)
    self.mlp = MoE(cfg, **kw) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size, **kw)

  def __call__(self, x, positions, *, cache=None, valid=None):
    h, cache = self.self_attn(self.input_layernorm(x), positions, cache=cache, valid=valid)
    h = x + h
    y = self.post_attention_layernorm(h)
    info = None
    if self.is_moe:
      y, info = self.mlp(y)
    else:
      y = self.mlp(y)
    return h + y, cache, info


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecoderOutput:
  logits: jax.Array | None  # [B, T, V] float32 (None when only hidden states were asked for)
  cache: list[LayerCache] | None
  router: list[RouterInfo]  # one per MoE layer, in layer order
  hidden_states: list[jax.Array] | None  # input + residual stream after each layer (before the final norm)
  last_hidden: jax.Array  # after the final norm


class Decoder(nnx.Module):

  def __init__(self, cfg: DecoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layers = nnx.List([DecoderLayer(cfg, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                            for i in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.lm_head = Dense(cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)

  def embed(self, ids: jax.Array) -> jax.Array:
    return self.embed_tokens(ids)

  def __call__(self, embeds: jax.Array, positions: jax.Array, *, cache: Sequence[LayerCache] | None = None,
               valid: jax.Array | None = None, return_hidden: bool = False,
               logits_at: jax.Array | None = None) -> DecoderOutput:
    """embeds `[B,T,H]`, positions `[B,T]`.

    `logits_at` `[B]`: compute logits only at that index of each row (prefill needs one position, not T).
    """
    x = embeds.astype(self.dtype)
    hidden = [x] if return_hidden else None
    new_cache = [] if cache is not None else None
    routers = []
    for i, layer in enumerate(self.layers):
      x, layer_cache, info = layer(x, positions, cache=None if cache is None else cache[i], valid=valid)
      if new_cache is not None:
        new_cache.append(layer_cache)
      if info is not None:
        routers.append(info)
      if hidden is not None:
        hidden.append(x)
    x = self.norm(x)
    if logits_at is not None:
      x_sel = jnp.take_along_axis(x, logits_at[:, None, None].astype(jnp.int32), axis=1)
      logits = self.lm_head(x_sel).astype(jnp.float32)
    else:
      logits = self.lm_head(x).astype(jnp.float32)
    return DecoderOutput(logits=logits, cache=new_cache, router=routers, hidden_states=hidden, last_hidden=x)
