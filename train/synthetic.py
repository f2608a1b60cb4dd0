"""Seeded synthetic OCR examples: a short random string rendered in black on a white image -> that string.

Example i of a set depends only on (seed, i), so any worker can render any example and a resumed run sees the
same data. Uses DejaVu Sans when the system has it, else Pillow's built-in scalable default font.
"""

from __future__ import annotations

import functools
import glob
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_FONT_GLOBS = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/**/DejaVuSans.ttf")


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
  for pattern in _FONT_GLOBS:
    for path in sorted(glob.glob(pattern, recursive=True)):
      if os.path.isfile(path):
        return ImageFont.truetype(path, size)
  return ImageFont.load_default(size)


def synthetic_text(seed: int, index: int, min_chars: int, max_chars: int) -> str:
  rng = np.random.default_rng([seed, index])
  n = int(rng.integers(min_chars, max_chars + 1))
  return "".join(ALPHABET[i] for i in rng.integers(0, len(ALPHABET), n))


def render(text: str, *, width: int, height: int, font_size: int, seed: int = 0, index: int = 0) -> Image.Image:
  """`text` in black on white at a small seeded offset (left-aligned, vertically near the middle)."""
  rng = np.random.default_rng([seed, index, 1])
  img = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(img)
  font = _font(font_size)
  left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
  x = int(rng.integers(2, max(3, width - (right - left) - 2)))
  y = max(0, (height - (bottom - top)) // 2 - top + int(rng.integers(-3, 4)))
  draw.text((x, y), text, fill=(0, 0, 0), font=font)
  return img


def example(seed: int, index: int, *, width: int, height: int, font_size: int, min_chars: int,
            max_chars: int) -> tuple[Image.Image, str]:
  """(image, its text) for example `index` of the set `seed`."""
  text = synthetic_text(seed, index, min_chars, max_chars)
  return render(text, width=width, height=height, font_size=font_size, seed=seed, index=index), text
