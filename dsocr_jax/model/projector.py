"""Projector (Linear 2048 -> 1280) and how image features enter the token sequence (spec 2.3-2.4, 4.5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def merge_embeddings(text_embeds: jax.Array, images_seq_mask: jax.Array, image_features: jax.Array) -> jax.Array:
  """Replaces, in order, the rows of `text_embeds` where the mask is True by the rows of `image_features`.

  text_embeds `[B,T,D]`, images_seq_mask `[B,T]` bool, image_features `[B,N,D]` (row b holds that prompt's
  image sequences concatenated in prompt order; rows past the mask count are padding). `masked_scatter`
  semantics of the official model.
  """
  idx = jnp.clip(jnp.cumsum(images_seq_mask.astype(jnp.int32), axis=1) - 1, 0, image_features.shape[1] - 1)
  gathered = jnp.take_along_axis(image_features, idx[..., None], axis=1).astype(text_embeds.dtype)
  return jnp.where(images_seq_mask[..., None], gathered, text_embeds)
