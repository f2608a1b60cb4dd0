"""Opening untrusted images: format sniffing, a pixel cap checked before decoding, EXIF orientation, RGB.

The official loaders (OFF-VLLM `load_image`, HUB `infer`) do `Image.open` -> `ImageOps.exif_transpose` ->
`convert('RGB')` (spec 4.2 step 1). We do the same, with two additions for a server that reads bytes from
strangers:
  * the pixel count is read from the header (`Image.open` is lazy) and refused above `max_pixels` before any
    pixel is decoded; Pillow's own decompression-bomb error is mapped to the same ValueError;
  * every Pillow failure (unknown format, truncated data) becomes a ValueError starting "image:".
Like the official loader, an image whose EXIF cannot be applied is used as stored rather than refused.

Alpha is NOT composited onto a background: `convert('RGB')` simply drops the alpha channel, so fully transparent
pixels keep whatever colour they store (often black). That is what the official inference feeds the model, so we
keep it.

One deliberate deviation: 16-bit greyscale (`I;16*`, and `I` when it holds values above 255) is rescaled to
8 bits (v / 257, rounded) before `convert('RGB')`. Pillow's direct conversion clips every value above 255 to
white, which turns a normal 16-bit scan into a blank page; the official code would feed that blank page.
"""

from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# 40 megapixels: a 300 dpi A3 scan is ~17.4 MP; a decoded RGB copy of the cap is 120 MB.
DEFAULT_MAX_PIXELS = 40_000_000

ImageSource = Union[bytes, bytearray, memoryview, str, os.PathLike, Image.Image]

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
  w, h = size
  if w <= 0 or h <= 0:
    raise ValueError(f"image: empty image ({w}x{h})")
  if w * h > max_pixels:
    raise ValueError(f"image: {w}x{h} = {w * h} pixels exceeds the limit of max_pixels={max_pixels}")


def _bomb_error(e: Exception) -> ValueError:
  return ValueError(
      f"image: exceeds Pillow's decompression-bomb limit (MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}): {e}")


def _to_rgb(img: Image.Image) -> Image.Image:
  if img.mode in _SIXTEEN_BIT_MODES or img.mode == "I":
    values = np.asarray(img, dtype=np.float64)
    # Deviation from the official code (see the module docstring): full-range 16-bit -> 8-bit. 32-bit `I` is
    # rescaled only when it holds values above 255 (Pillow would clip them); 8-bit data stored as `I` stay as is.
    if img.mode != "I" or values.max(initial=0) > 255:
      img = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8))
  # For RGBA / LA / PA / P-with-transparency this drops alpha without compositing, exactly as the official code.
  return img if img.mode == "RGB" else img.convert("RGB")


def _open_lazy(src: ImageSource) -> Image.Image:
  if isinstance(src, (bytes, bytearray, memoryview)):
    fp, name = io.BytesIO(bytes(src)), f"<{len(src)} bytes>"
  elif isinstance(src, (str, os.PathLike)):
    fp = name = os.fspath(src)
    if not os.path.isfile(fp):
      raise ValueError(f"image: cannot open file {name!r}: no such file")
  else:
    raise ValueError(f"image: expected bytes, a path or a PIL image, got {type(src).__name__}")
  try:
    return Image.open(fp)
  except Image.DecompressionBombError as e:
    raise _bomb_error(e) from None
  except UnidentifiedImageError:
    raise ValueError(f"image: cannot identify image file {name}") from None
  except (OSError, SyntaxError, ValueError) as e:  # Pillow plugins raise all three on malformed headers
    raise ValueError(f"image: cannot identify image file {name}: {e}") from None


def open_image(src: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
  """Returns an RGB, EXIF-transposed PIL image from bytes, a path or an existing PIL image.

  Anything Pillow opens is accepted (PNG, JPEG, WebP, BMP, GIF/animated WebP (first frame), TIFF, palette,
  CMYK, 16-bit, LA/RGBA). Raises ValueError for unreadable data or more than `max_pixels` pixels.
  """
  if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels <= 0:
    raise ValueError(f"max_pixels: must be a positive integer, got {max_pixels!r}")
  if isinstance(src, Image.Image):
    return _decode(src, max_pixels)
  with _open_lazy(src) as img:  # closes the file (kept open by Pillow for multi-frame formats)
    return _decode(img, max_pixels)


def _decode(img: Image.Image, max_pixels: int) -> Image.Image:
  _check_pixels(img.size, max_pixels)  # header size only: nothing has been decoded yet
  try:
    img.load()
    try:
      # A copy, rotated/flipped when the EXIF Orientation tag asks for it.
      upright = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - official `load_image` falls back to the untransposed image on any error
      upright = img.copy()
    return _to_rgb(upright)
  except Image.DecompressionBombError as e:
    raise _bomb_error(e) from None
  except (OSError, SyntaxError, ValueError, EOFError) as e:
    raise ValueError(f"image: cannot decode image data: {e}") from None
