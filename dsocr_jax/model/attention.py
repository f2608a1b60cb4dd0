"""Decoder self-attention: plain multi-head attention with rotate-half RoPE and an optional KV cache (spec 3).

The KV cache of one layer is a pair `(k, v)` of `[batch, max_len, kv_heads, head_dim]` arrays in which cache
index == absolute position. A call writes its new keys/values at `positions[:, 0]` onwards and then attends
over the whole cache with the mask `key_index <= query_position`, so a prefill (many tokens) and a decode step
(one token per slot, each slot at its own position) are the same code. Padded tokens of a prefill bucket write
garbage beyond the prompt; a later decode step overwrites each such entry before any query can see it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsocr_jax.config import DecoderConfig
from dsocr_jax.model.layers import Dense

LayerCache = tuple[jax.Array, jax.Array]


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables `[B, T, head_dim]` in float32 (HF Llama: freqs duplicated over both halves)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate-half (NeoX) pairing of dims i and i + head_dim/2; x is `[B, T, heads, head_dim]`."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


def _write(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
  """Writes new[b] into cache[b, start[b]:start[b]+T] for every row b."""
  return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), s, axis=0))(
      cache, new, start)


DECODE_BLOCK = 256


def decode_attention(q, k_cache, v_cache, positions, scale, block: int = DECODE_BLOCK):
  """One query per row over a cache, reading only the key blocks up to the highest live position.

  q `[B,1,H,D]`, caches `[B,S,H,D]`, positions `[B,1]`. Attending over the whole preallocated cache would
  read `max_len` keys per step however short the context; this loop (online softmax, float32) stops at
  `max(positions) // block`. Blocks past a row's own position are fully masked and contribute exactly
  zero, so a row's result does not depend on the other rows (batch invariance).
  """
  b, s, h, d = k_cache.shape
  n_blocks = jnp.max(positions) // block + 1
  qf = q.astype(jnp.float32)
  neg = jnp.finfo(jnp.float32).min

  def body(j, carry):
    m, l, acc = carry
    kb = jax.lax.dynamic_slice_in_dim(k_cache, j * block, block, axis=1).astype(jnp.float32)
    vb = jax.lax.dynamic_slice_in_dim(v_cache, j * block, block, axis=1).astype(jnp.float32)
    logits = jnp.einsum("bthd,bshd->bhts", qf, kb) * scale
    key_pos = j * block + jnp.arange(block)
    logits = jnp.where(key_pos[None, None, None, :] <= positions[:, None, :, None], logits, neg)
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1, keepdims=True))
    p = jnp.exp(logits - m_new)
    corr = jnp.exp(m - m_new)
    return m_new, l * corr + jnp.sum(p, axis=-1, keepdims=True), acc * corr + jnp.einsum("bhts,bshd->bhtd", p, vb)

  init = (jnp.full((b, h, 1, 1), neg), jnp.zeros((b, h, 1, 1)), jnp.zeros((b, h, 1, d)))
  _, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
  return (acc / l).transpose(0, 2, 1, 3).astype(q.dtype)


def dot_product_attention(q, k, v, mask, scale):
  """q `[B,T,H,D]`, k/v `[B,S,H,D]`, mask `[B,T,S]` (True = attend). Softmax in float32."""
  logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhts,bshd->bthd", probs, v)


class Attention(nnx.Module):

  def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.num_heads = cfg.num_attention_heads
    self.num_kv_heads = cfg.num_key_value_heads
    self.head_dim = cfg.head_dim
    self.rope_theta = cfg.rope_theta
    h, qd, kvd = cfg.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = Dense(h, qd, axes=("embed", "heads"), **kw)
    self.k_proj = Dense(h, kvd, axes=("embed", "kv_heads"), **kw)
    self.v_proj = Dense(h, kvd, axes=("embed", "kv_heads"), **kw)
    self.o_proj = Dense(qd, h, axes=("heads", "embed"), **kw)

  def __call__(self, x: jax.Array, positions: jax.Array, *, cache: LayerCache | None = None,
               valid: jax.Array | None = None) -> tuple[jax.Array, LayerCache | None]:
    """x `[B,T,hidden]`, positions `[B,T]`; `valid` `[B,T]` masks padding keys when there is no cache."""
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    cos, sin = rope_tables(positions, self.head_dim, self.rope_theta)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    if cache is None:
      key_pos = positions
      mask = key_pos[:, None, :] <= positions[:, :, None]
      if valid is not None:
        mask = mask & valid[:, None, :]
      new_cache = None
    else:
      k_cache, v_cache = cache
      k_cache = _write(k_cache, k, positions[:, 0])
      v_cache = _write(v_cache, v, positions[:, 0])
      new_cache = (k_cache, v_cache)
      if t == 1 and k_cache.shape[1] % DECODE_BLOCK == 0:
        out = decode_attention(q, k_cache, v_cache, positions, self.head_dim ** -0.5)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), new_cache
      k, v = k_cache.astype(q.dtype), v_cache.astype(q.dtype)
      key_pos = jnp.arange(k.shape[1], dtype=positions.dtype)
      mask = key_pos[None, None, :] <= positions[:, :, None]

    out = dot_product_attention(q, k, v, mask, self.head_dim ** -0.5)
    return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), new_cache
