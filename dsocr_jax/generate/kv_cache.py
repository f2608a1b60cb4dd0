"""The serving KV cache: one preallocated `(k, v)` pair per layer, `[slots, kv_heads, max_len, head_dim]`.

Cache index == absolute position (see `dsocr_jax.model.attention`). A slot is filled by a prefill that runs on a
fresh bucket-sized cache of its own and is then copied into rows [0, bucket) of the slot; a decode step then
writes one position per slot. Stale entries of a slot's previous request beyond the new prompt are never read:
a decode at position p overwrites index p before attending keys <= p.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsocr_jax.config import DecoderConfig
from dsocr_jax.model.attention import LayerCache

Cache = list[LayerCache]


def cache_shape(cfg: DecoderConfig, slots: int, max_len: int) -> tuple[int, int, int, int]:
  return (slots, cfg.num_key_value_heads, max_len, cfg.head_dim)  # heads first: see model/attention.py


def cache_bytes(cfg: DecoderConfig, slots: int, max_len: int, dtype) -> int:
  s = cache_shape(cfg, slots, max_len)
  return 2 * cfg.num_hidden_layers * s[0] * s[1] * s[2] * s[3] * jnp.dtype(dtype).itemsize


def init_cache(cfg: DecoderConfig, slots: int, max_len: int, dtype) -> Cache:
  shape = cache_shape(cfg, slots, max_len)
  return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_hidden_layers)]


def write_slot(cache: Cache, rows: Cache, slot: jax.Array) -> Cache:
  """Copies `rows` (a one-slot cache `[1, H, L, D]`, L <= max_len) into positions [0, L) of `slot`."""
  def put(big, small):
    return jax.lax.dynamic_update_slice(big, small.astype(big.dtype), (slot, 0, 0, 0))
  return [(put(k, rk), put(v, rv)) for (k, v), (rk, rv) in zip(cache, rows)]
