"""Image -> normalised global view + local tiles + placeholder count, bit-exact with the official processor.

Follows OFF-VLLM `process/image_process.py::tokenize_with_images` and `dynamic_preprocess` (spec 4.2-4.4):
  1. tile decision: both sides <= 640 (a literal 640 in every mode) -> no tiles; otherwise, in crop mode,
     dynamic tiling with tile size `image_size`; crop mode off -> no tiles;
  2. global view: Tiny/Small (no crop, image_size <= 640) first squash-resize to image_size x image_size, then
     `ImageOps.pad` to base_size x base_size (aspect-preserving bicubic, centred on colour (127,127,127));
  3. tiles: squash-resize the ORIGINAL image to (tw*S, th*S) and cut row-major S x S tiles;
  4. normalise: (x/255 - 0.5)/0.5 in float32.
All resizing is Pillow's (bicubic with antialiasing); reimplementing it would not be bit-exact. Arrays here are
channels-last (H, W, C); the official tensors are CHW.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageOps

from dsocr_jax.config import ImageMode, get_mode

# Views whose sides are both <= this are never tiled, whatever the mode's tile size (spec 4.2 step 2).
NO_TILING_MAX_SIDE = 640
# The official pad colour is tuple(int(m * 255) for m in mean) with mean 0.5: 127, not 127.5 (normalises to -1/255).
PAD_COLOR = (127, 127, 127)
# Upper bound we accept for max_crops: the transformers port's `dynamic_hd` (spec 8.1). A 6x6 Gundam grid is already
# 273 + 60*61 = 3,933 placeholders of the 8,192-token context.
MAX_CROPS_LIMIT = 36

# CPython set order of the official candidate set for min 2 (spec 4.3), hard-coded to stay exact whatever
# interpreter runs us. Entries are (width tiles, height tiles).
OFFICIAL_CANDIDATES: dict[tuple[int, int], tuple[tuple[int, int], ...]] = {
    (2, 6): ((1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4), (2, 2), (1, 5), (5, 1), (6, 1), (2, 3), (1, 6),
             (3, 2)),
    (2, 9): ((1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6), (6, 1), (3, 2),
             (2, 3), (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1), (1, 9), (3, 3), (9, 1)),
}


@dataclasses.dataclass(frozen=True)
class PreprocessedImage:
  """One image ready for the vision encoder."""
  global_view: np.ndarray  # [base, base, 3] float32, normalised
  tiles: np.ndarray  # [n, S, S, 3] float32, row-major over the tile grid; n = 0 without tiles
  spatial_crop: tuple[int, int]  # (w_tiles, h_tiles); (1, 1) without tiles
  num_tokens: int  # `<image>` placeholders this image expands to
  mode: ImageMode
  original_size: tuple[int, int]  # (W, H) after EXIF transpose; grounding boxes are relative to it

  @property
  def num_tiles(self) -> int:
    return int(self.tiles.shape[0])


def python_set_order(min_crops: int, max_crops: int) -> tuple[tuple[int, int], ...]:
  """The official candidate expression, evaluated here: a Python `set` stable-sorted by w*h.

  [I] On CPython >= 3.8 this reproduces the official order (small-int tuple hashing is deterministic there, and a
  test checks that it regenerates both hard-coded lists); another interpreter may order equal products
  differently, which only matters when two grids tie exactly on aspect-ratio difference.
  """
  grids = set((i, j) for n in range(min_crops, max_crops + 1) for i in range(1, n + 1) for j in range(1, n + 1)
              if min_crops <= i * j <= max_crops)
  return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def candidate_grids(min_crops: int, max_crops: int) -> tuple[tuple[int, int], ...]:
  """Tile grids (w, h) with min_crops <= w*h <= max_crops, in the order the official code scans them: the
  spec's hard-coded lists for (2, 6) and (2, 9), `python_set_order` for any other bounds."""
  return OFFICIAL_CANDIDATES.get((min_crops, max_crops)) or python_set_order(min_crops, max_crops)


def _validate_crops(min_crops: int, max_crops: int) -> None:
  for name, value in (("min_crops", min_crops), ("max_crops", max_crops)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name}: must be a positive integer, got {value!r}")
  if max_crops < min_crops:
    raise ValueError(f"max_crops: {max_crops} is smaller than min_crops {min_crops}")
  if max_crops > MAX_CROPS_LIMIT:
    raise ValueError(f"max_crops: {max_crops} exceeds the supported maximum of {MAX_CROPS_LIMIT}")


def find_tile_grid(width: int, height: int, *, image_size: int, min_crops: int = 2,
                   max_crops: int = 6) -> tuple[int, int]:
  """The official `find_closest_aspect_ratio`: the (w_tiles, h_tiles) grid whose ratio is closest to w/h.

  On an exactly equal difference a later candidate replaces the current best iff the image area exceeds half
  the grid's pixel area (`w*h > 0.5 * S^2 * i*j`), so a large image prefers the finer of two equal grids.
  This does not apply the <= 640 no-tiling rule; `preprocess` does.
  """
  _validate_crops(min_crops, max_crops)
  aspect = width / height
  area = width * height
  best_diff, best = float("inf"), (1, 1)
  for i, j in candidate_grids(min_crops, max_crops):
    diff = abs(aspect - i / j)
    if diff < best_diff:
      best_diff, best = diff, (i, j)
    elif diff == best_diff and area > 0.5 * image_size * image_size * i * j:
      best = (i, j)
  return best


def num_image_tokens(mode: ImageMode, spatial_crop: tuple[int, int]) -> int:
  """Placeholder count: q(q+1) + 1 for the global view (+ newline column, + separator), plus the tile mosaic
  (q2*th)(q2*tw + 1) when there is more than one tile; q = ceil(base/16/4), q2 = ceil(image_size/16/4)."""
  tw, th = spatial_crop
  q = math.ceil(mode.base_size / 16 / 4)
  tokens = q * (q + 1) + 1
  if tw * th > 1:
    q2 = math.ceil(mode.image_size / 16 / 4)
    tokens += (q2 * th) * (q2 * tw + 1)
  return tokens


def normalise(image: Image.Image) -> np.ndarray:
  """uint8 RGB image -> [H, W, 3] float32 in [-1, 1].

  x/255 then (x - 0.5)/0.5, each step rounded to float32 as torchvision's ToTensor + Normalize do. In place on
  one buffer (a 256-entry lookup-table gather gives the same floats but measured slower on this CPU).
  """
  x = np.asarray(image, dtype=np.uint8).astype(np.float32)
  x /= np.float32(255)
  x -= np.float32(0.5)
  x /= np.float32(0.5)
  return x


def global_view_image(image: Image.Image, mode: ImageMode) -> Image.Image:
  """The padded global view as a PIL image (before normalisation)."""
  if not mode.crop_mode and mode.image_size <= NO_TILING_MAX_SIDE:
    # Tiny / Small squash first (no aspect ratio kept); the pad below is then a plain resize or a no-op.
    image = image.resize((mode.image_size, mode.image_size), Image.Resampling.BICUBIC)
  return ImageOps.pad(image, (mode.base_size, mode.base_size), Image.Resampling.BICUBIC, color=PAD_COLOR)


def tile_grid_for(image_size: tuple[int, int], mode: ImageMode, *, min_crops: int = 2,
                  max_crops: int = 6) -> tuple[int, int]:
  """(w_tiles, h_tiles) that `preprocess` uses for an image of (W, H) in `mode`."""
  _validate_crops(min_crops, max_crops)
  w, h = image_size
  if not mode.crop_mode or (w <= NO_TILING_MAX_SIDE and h <= NO_TILING_MAX_SIDE):
    return (1, 1)
  return find_tile_grid(w, h, image_size=mode.image_size, min_crops=min_crops, max_crops=max_crops)


def _tiles(image: Image.Image, grid: tuple[int, int], size: int) -> np.ndarray:
  tw, th = grid
  if tw * th <= 1:
    # The official code keeps tiles only when w_tiles > 1 or h_tiles > 1 (a (1, 1) pick with min_crops = 1 too).
    return np.zeros((0, size, size, 3), np.float32)
  resized = image.resize((tw * size, th * size), Image.Resampling.BICUBIC)
  mosaic = normalise(resized).reshape(th, size, tw, size, 3)
  # Tile t sits at grid row t // tw, column t % tw (row-major), as the official `crop` loop.
  return np.ascontiguousarray(mosaic.transpose(0, 2, 1, 3, 4).reshape(th * tw, size, size, 3))


def preprocess(image: Image.Image, mode: ImageMode | str, *, min_crops: int = 2,
               max_crops: int = 6) -> PreprocessedImage:
  """Global view, tiles and placeholder count for one image (RGB; other modes are converted like the official
  loader does). `max_crops` 6 is the vLLM default, 9 the hub `infer` default (spec 8.1)."""
  if isinstance(mode, str):
    mode = get_mode(mode)
  if not isinstance(image, Image.Image):
    raise ValueError(f"image: expected a PIL image, got {type(image).__name__}")
  if image.width <= 0 or image.height <= 0:
    raise ValueError(f"image: empty image ({image.width}x{image.height})")
  if image.mode != "RGB":
    image = image.convert("RGB")
  grid = tile_grid_for(image.size, mode, min_crops=min_crops, max_crops=max_crops)
  return PreprocessedImage(
      global_view=normalise(global_view_image(image, mode)),
      tiles=_tiles(image, grid, mode.image_size),
      spatial_crop=grid,
      num_tokens=num_image_tokens(mode, grid),
      mode=mode,
      original_size=(image.width, image.height))
