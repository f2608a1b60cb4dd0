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


def fuse_features(clip_out: jax.Array, sam_out: jax.Array) -> jax.Array:
  """The projector input: concat(CLIP output without CLS, SAM map flattened row-major), CLIP channels first.

  clip_out `[n, 1 + g*g, C1]`, sam_out `[n, g, g, C2]` -> `[n, g*g, C1 + C2]` (spec 2.3).
  """
  n, g, _, c2 = sam_out.shape
  return jnp.concatenate([clip_out[:, 1:], sam_out.reshape(n, g * g, c2).astype(clip_out.dtype)], axis=-1)


def with_newlines(grid: jax.Array, newline: jax.Array) -> jax.Array:
  """`[rows, cols, D]` -> `[rows * (cols + 1), D]`: `image_newline` appended after every row, then flattened."""
  rows, _, d = grid.shape
  column = jnp.broadcast_to(newline.astype(grid.dtype), (rows, 1, d))
  return jnp.concatenate([grid, column], axis=1).reshape(-1, d)


def global_layout(features: jax.Array, newline: jax.Array) -> jax.Array:
  """One view's projected tokens `[g*g, D]` -> `[g * (g + 1), D]` (row-major grid with a newline column)."""
  g = int(round(features.shape[0] ** 0.5))
  return with_newlines(features.reshape(g, g, -1), newline)


def tile_mosaic_layout(tiles: jax.Array, spatial_crop: tuple[int, int], newline: jax.Array) -> jax.Array:
  """Projected tiles `[w*h, m*m, D]` (row-major over the tile grid) -> the stitched mosaic with newlines,
  `[(h*m) * (w*m + 1), D]`: tile t sits at grid row t // w, column t % w (spec 2.4)."""
  w_tiles, h_tiles = spatial_crop
  n, mm, d = tiles.shape
  if n != w_tiles * h_tiles:
    raise ValueError(f"spatial_crop: {n} tiles do not fill a {w_tiles}x{h_tiles} grid")
  m = int(round(mm ** 0.5))
  mosaic = tiles.reshape(h_tiles, w_tiles, m, m, d).transpose(0, 2, 1, 3, 4).reshape(h_tiles * m, w_tiles * m, d)
  return with_newlines(mosaic, newline)


def image_sequence(global_features: jax.Array, tile_features: jax.Array | None, spatial_crop: tuple[int, int],
                   newline: jax.Array, separator: jax.Array) -> jax.Array:
  """One image's vectors for its `<image>` placeholders: [tile mosaic (if any tiles)] + [global] + [separator].

  global_features `[g*g, D]`, tile_features `[n, m*m, D]` or None / n == 0 (global-only, as the official code
  does when the crop tensor is empty). The global view comes after the tiles (spec 2.4, 8.3).
  """
  parts = []
  if tile_features is not None and tile_features.shape[0] > 0:
    parts.append(tile_mosaic_layout(tile_features, spatial_crop, newline))
  parts.append(global_layout(global_features, newline))
  parts.append(separator.astype(global_features.dtype)[None])
  return jnp.concatenate(parts, axis=0)
