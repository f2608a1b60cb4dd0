"""The two compiled programs of the serving engine: prefill one slot, and one decode step over all slots.

Both are pure functions of (decoder params, cache, generated-token counts, inputs) under `jax.jit`, with the
cache and the counts donated so they are updated in place. Shapes are fixed per engine: the decode step always
runs all `slots` rows (idle rows compute garbage that nobody reads), and a prefill is padded to one of a few
length buckets, so after warm-up nothing compiles on the request path. Every trace is counted in `traces`.
"""

from __future__ import annotations

import collections
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsocr_jax.generate import kv_cache
from dsocr_jax.generate.sampling import MAX_NGRAM_WINDOW, Sampled, SlotSampling, count_tokens, sample
from dsocr_jax.model.projector import merge_embeddings

log = logging.getLogger(__name__)


class StepFunctions:
  """Holds the split decoder, the device state of all slots (cache, counts) and the jitted steps."""

  def __init__(self, decoder: nnx.Module, *, slots: int, max_len: int, buckets: tuple[int, ...], dtype):
    self.cfg = decoder.cfg
    self.slots, self.max_len, self.buckets = slots, max_len, tuple(sorted(buckets))
    self.dtype = dtype
    self.graphdef, self.params = nnx.split(decoder)
    self.traces: collections.Counter = collections.Counter()
    self.cache = kv_cache.init_cache(self.cfg, slots, max_len, dtype)
    self.counts = jnp.zeros((slots, self.cfg.vocab_size), jnp.int32)
    self._prefill = jax.jit(self._prefill_impl, donate_argnums=(1, 2))
    self._decode = jax.jit(self._decode_impl, donate_argnums=(1, 2))

  # ------------------------------------------------------------------------------------------- traced code

  def _prefill_impl(self, params, cache, counts, ids, image_mask, image_features, length, slot, sampling,
                    want_top):
    """ids/image_mask [1,L], image_features [1,L,D] (padded), length/slot scalars -> first token of the slot."""
    bucket = ids.shape[1]
    self.traces[("prefill", bucket)] += 1
    decoder = nnx.merge(self.graphdef, params)
    embeds = merge_embeddings(decoder.embed(ids), image_mask, image_features)
    positions = jnp.arange(bucket, dtype=jnp.int32)[None]
    fresh = kv_cache.init_cache(self.cfg, 1, bucket, self.dtype)
    out = decoder(embeds, positions, cache=fresh, logits_at=(length - 1)[None])
    cache = kv_cache.write_slot(cache, out.cache, slot)
    no_counts = jnp.zeros((1, counts.shape[1]), counts.dtype)
    no_bans = jnp.full((1, MAX_NGRAM_WINDOW), -1, jnp.int32)
    sampled = sample(out.logits[:, 0], no_counts, sampling, no_bans, want_top)
    counts = jax.lax.dynamic_update_slice(counts, count_tokens(no_counts, sampled.tokens), (slot, 0))
    return cache, counts, sampled

  def _decode_impl(self, params, cache, counts, tokens, positions, sampling, banned, want_top):
    """tokens/positions [S]: feed each slot's last token at its own position; sample the next one."""
    self.traces[("decode", tokens.shape[0])] += 1
    decoder = nnx.merge(self.graphdef, params)
    out = decoder(decoder.embed(tokens[:, None]), positions[:, None], cache=cache)
    sampled = sample(out.logits[:, 0], counts, sampling, banned, want_top)
    return out.cache, count_tokens(counts, sampled.tokens), sampled

  # ------------------------------------------------------------------------------------------- host calls

  def bucket_for(self, length: int) -> int:
    for b in self.buckets:
      if length <= b:
        return b
    raise ValueError(f"input_ids: prompt of {length} tokens exceeds the largest prefill bucket {self.buckets[-1]}")

  def prefill(self, slot: int, ids: np.ndarray, image_mask: np.ndarray | None, image_features: np.ndarray | None,
              sampling: SlotSampling, want_top: bool) -> Sampled:
    """Fills `slot` with the prompt and returns its first sampled token (host arrays)."""
    t = len(ids)
    bucket = self.bucket_for(t)
    hidden = self.cfg.hidden_size
    ids_p = np.zeros((1, bucket), np.int32)
    ids_p[0, :t] = ids
    mask_p = np.zeros((1, bucket), bool)
    feats_p = np.zeros((1, bucket, hidden), np.dtype(self.dtype))
    if image_mask is not None and image_features is not None and len(image_features):
      mask_p[0, :t] = image_mask
      feats_p[0, :len(image_features)] = image_features
    self.cache, self.counts, sampled = self._prefill(
        self.params, self.cache, self.counts, ids_p, mask_p, feats_p, np.int32(t), np.int32(slot), sampling,
        np.bool_(want_top))
    return jax.device_get(sampled)

  def decode(self, tokens: np.ndarray, positions: np.ndarray, sampling: SlotSampling, banned: np.ndarray,
             want_top: bool) -> Sampled:
    self.cache, self.counts, sampled = self._decode(
        self.params, self.cache, self.counts, tokens, positions, sampling, banned, np.bool_(want_top))
    return jax.device_get(sampled)

  def warmup(self) -> None:
    """Compiles every prefill bucket and the decode step (idle inputs; slot 0's contents are garbage after)."""
    idle = SlotSampling.empty(1)
    for b in self.buckets:
      self.prefill(0, np.zeros(b, np.int32), None, None, idle, False)
      log.info("compiled prefill: bucket %d tokens, slot cache [%d, %d]", b, self.slots, self.max_len)
    s = self.slots
    self.decode(np.zeros(s, np.int32), np.zeros(s, np.int32), SlotSampling.empty(s),
                np.full((s, MAX_NGRAM_WINDOW), -1, np.int32), False)
    log.info("compiled decode step: %d slots x 1 token, cache [%d layers, %d slots, %d heads, %d positions, %d]", s,
             self.cfg.num_hidden_layers, s, self.cfg.num_key_value_heads, self.max_len, self.cfg.head_dim)
