"""CLIP-L vision transformer fed with SAM features instead of its own patches (spec 2.2).

`model.vision_model`: the SAM map `[n, g, g, C]` is flattened row-major to g*g tokens, a CLS token is prepended,
the learned 257-row position table is added (its 16x16 grid resized to g x g with PyTorch's antialiased bicubic
when g != 16, the CLS row kept), then `pre_layrnorm` and the pre-norm layers (quick_gelu MLP). No post-norm.
CLIP's own patch conv is in the checkpoint but never used, so it is not a parameter here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsocr_jax.config import ClipConfig
from dsocr_jax.model.layers import Dense, LayerNorm, default_init, param
from dsocr_jax.model.resize import resize_grid_bicubic_aa
from dsocr_jax.model.sam import split_heads, vit_attention


def quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


class ClipAttention(nnx.Module):

  def __init__(self, cfg: ClipConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    c = cfg.width
    self.heads = cfg.heads
    self.q_proj = Dense(c, c, axes=("embed", "heads"), **kw)
    self.k_proj = Dense(c, c, axes=("embed", "heads"), **kw)
    self.v_proj = Dense(c, c, axes=("embed", "heads"), **kw)
    self.out_proj = Dense(c, c, axes=("heads", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    q, k, v = (split_heads(p(x), self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
    out = vit_attention(q, k, v)
    return self.out_proj(out.reshape(x.shape))


class ClipMLP(nnx.Module):

  def __init__(self, cfg: ClipConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = Dense(cfg.width, cfg.ffn_hidden_size, axes=("embed", "mlp"), **kw)
    self.fc2 = Dense(cfg.ffn_hidden_size, cfg.width, axes=("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(quick_gelu(self.fc1(x)))


class ClipLayer(nnx.Module):

  def __init__(self, cfg: ClipConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layer_norm1 = LayerNorm(cfg.width, eps=cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.self_attn = ClipAttention(cfg, **kw)
    self.layer_norm2 = LayerNorm(cfg.width, eps=cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.mlp = ClipMLP(cfg, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.mlp(self.layer_norm2(x))


class ClipVision(nnx.Module):
  """SAM features `[n, g, g, C]` -> `[n, 1 + g*g, C]` (CLS first)."""

  def __init__(self, cfg: ClipConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg, self.dtype = cfg, dtype
    c = cfg.width
    self.class_embedding = param(rngs, default_init, (c,), param_dtype, ("embed",))
    self.position_embedding = param(rngs, default_init, (cfg.pos_grid ** 2 + 1, c), param_dtype, ("pos", "embed"))
    self.pre_layrnorm = LayerNorm(c, eps=cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.layers = nnx.List([ClipLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                            for _ in range(cfg.layers)])

  def position_table(self, grid: int) -> jax.Array:
    """`[1 + grid*grid, C]`: the CLS row, then the 16x16 grid resized to grid x grid (official `get_abs_pos`)."""
    table = self.position_embedding[...]
    src = self.cfg.pos_grid
    patches = resize_grid_bicubic_aa(table[1:].reshape(src, src, -1), grid, grid)
    return jnp.concatenate([table[:1], patches.reshape(grid * grid, -1)], axis=0)

  def __call__(self, sam_features: jax.Array) -> jax.Array:
    n, g, g2, c = sam_features.shape
    if g != g2 or c != self.cfg.width:
      raise ValueError(f"sam_features: expected [n, g, g, {self.cfg.width}], got {list(sam_features.shape)}")
    patches = sam_features.reshape(n, g * g, c).astype(self.dtype)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (n, 1, c))
    x = jnp.concatenate([cls, patches], axis=1) + self.position_table(g).astype(self.dtype)
    x = self.pre_layrnorm(x)
    for layer in self.layers:
      x = layer(x)
    return x
