"""The whole DeepSeek-OCR model: DeepEncoder (SAM + CLIP + projector), the 2-D image layout, and the decoder.

Parameter tree (top level, matching `checkpoint.keymap`): `sam_model`, `vision_model`, `projector`,
`image_newline`, `view_seperator` (sic), `decoder`.

Vision runs per view size: `encode_views_jit` is a pure jitted function of (graphdef, state, views), so a page
compiles once per view size (global 1024 / tile 640 ...) and all tiles of a page go through in one call.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dsocr_jax.config import ModelConfig
from dsocr_jax.model.clip import ClipVision
from dsocr_jax.model.decoder import Decoder, DecoderOutput
from dsocr_jax.model.layers import Dense, default_init, param
from dsocr_jax.model.projector import fuse_features, image_sequence, merge_embeddings
from dsocr_jax.model.sam import SamEncoder


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ViewOutputs:
  """Encoder outputs for a batch of same-size views (channels-last)."""
  sam: jax.Array  # [n, g, g, C] after net_3
  clip: jax.Array  # [n, 1 + g*g, C], CLS first
  proj: jax.Array  # [n, g*g, D]


class DeepseekOCR(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg, self.dtype = cfg, dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d = cfg.projector.n_embed
    self.sam_model = SamEncoder(cfg.sam, **kw)
    self.vision_model = ClipVision(cfg.clip, **kw)
    self.projector = Dense(cfg.projector.input_dim, d, axes=("mlp", "embed"), use_bias=True, **kw)
    self.image_newline = param(rngs, default_init, (d,), param_dtype, ("embed",))
    self.view_seperator = param(rngs, default_init, (d,), param_dtype, ("embed",))
    self.decoder = Decoder(cfg.decoder, **kw)

  # ----------------------------------------------------------------------------------------------- vision

  def encode_views(self, views: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """views `[n, S, S, 3]` normalised NHWC -> (sam `[n, g, g, C]`, clip `[n, 1+g*g, C]`, proj `[n, g*g, D]`)."""
    sam = self.sam_model(views)
    clip = self.vision_model(sam)
    return sam, clip, self.projector(fuse_features(clip, sam))

  def layout(self, proj_global: jax.Array, proj_tiles: jax.Array | None, spatial_crop: tuple[int, int]) -> jax.Array:
    """One image's projected views -> its `[N, D]` placeholder vectors (tiles mosaic, global, separator)."""
    return image_sequence(proj_global, proj_tiles, spatial_crop, self.image_newline[...], self.view_seperator[...])

  def image_features(self, global_view: jax.Array, tiles: jax.Array | None,
                     spatial_crop: tuple[int, int]) -> jax.Array:
    """One image -> `[N, D]`: global view `[B, B, 3]`, tiles `[n, S, S, 3]` (or None / n == 0), (w, h) tiles."""
    return encode_image(self, global_view, tiles, spatial_crop)[0]

  # ----------------------------------------------------------------------------------------------- text

  def embed(self, input_ids: jax.Array, image_features: jax.Array | None = None,
            images_seq_mask: jax.Array | None = None) -> jax.Array:
    """Token embeddings `[B, T, D]` with the image vectors scattered in at the mask positions."""
    embeds = self.decoder.embed(input_ids)
    if image_features is None:
      return embeds
    if images_seq_mask is None:
      raise ValueError("images_seq_mask: required when image_features is given")
    return merge_embeddings(embeds, images_seq_mask, image_features)

  def __call__(self, input_ids: jax.Array, positions: jax.Array, *, image_features: jax.Array | None = None,
               images_seq_mask: jax.Array | None = None, cache=None, valid: jax.Array | None = None,
               return_hidden: bool = False, logits_at: jax.Array | None = None) -> DecoderOutput:
    """input_ids/positions `[B, T]`; image_features `[B, N, D]` replaces the rows where images_seq_mask is True."""
    embeds = self.embed(input_ids, image_features, images_seq_mask)
    return self.decoder(embeds, positions, cache=cache, valid=valid, return_hidden=return_hidden,
                        logits_at=logits_at)


@functools.partial(jax.jit, static_argnums=0)
def _encode_views_pure(graphdef: nnx.GraphDef, state: nnx.State, views: jax.Array) -> ViewOutputs:
  return ViewOutputs(*nnx.merge(graphdef, state).encode_views(views))


def encode_views_jit(model: DeepseekOCR, views: jax.Array) -> ViewOutputs:
  """`model.encode_views` compiled once per (views shape, dtype); every view of the batch has the same size."""
  graphdef, state = nnx.split(model)
  return _encode_views_pure(graphdef, state, jnp.asarray(views))


def encode_image(model: DeepseekOCR, global_view: jax.Array, tiles: jax.Array | None,
                 spatial_crop: tuple[int, int]) -> tuple[jax.Array, ViewOutputs, ViewOutputs | None]:
  """One image through the encoder: (features `[N, D]`, global view outputs, tile outputs or None)."""
  glob = encode_views_jit(model, jnp.asarray(global_view)[None])
  tile_out = None
  if tiles is not None and tiles.shape[0] > 0:
    w, h = spatial_crop
    if tiles.shape[0] != w * h:
      raise ValueError(f"spatial_crop: {tiles.shape[0]} tiles do not fill a {w}x{h} grid")
    tile_out = encode_views_jit(model, tiles)
  features = model.layout(glob.proj[0], None if tile_out is None else tile_out.proj, tuple(spatial_crop))
  return features, glob, tile_out
