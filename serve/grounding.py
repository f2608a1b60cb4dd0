"""Parsing the model's grounding spans (spec 5.5) into labels and boxes.

The model writes `<|ref|>LABEL<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>`, coordinates integers on a 0-999
grid relative to the original image (after EXIF transpose, before padding or tiling). Pixels:
`x_px = int(x / 999 * W)`, `y_px = int(y / 999 * H)` (divisor 999, not 1000).

The official scripts `eval()` the box list. We parse it with a small grammar instead (a list of lists of four
integers, whitespace allowed); a span whose box list does not follow it is skipped, never executed. Grid values
outside 0-999 are clamped before conversion so that a pixel box always lies inside the image.
"""

from __future__ import annotations

import dataclasses
import re

_SPAN = re.compile(r"<\|ref\|>(.*?)<\|/ref\|><\|det\|>(.*?)<\|/det\|>", re.DOTALL)
_INT = r"\s*(-?\d{1,9})\s*"
_BOX = re.compile(r"\[" + ",".join([_INT] * 4) + r"\]")
_SEP = re.compile(r"\s*,?\s*")

GRID_MAX = 999


@dataclasses.dataclass(frozen=True)
class GroundingSpan:
  label: str
  boxes_normalized: list[list[int]]  # as written by the model, clamped to [0, 999]
  boxes: list[list[int]] | None  # pixels of the original image; None without an image size


def parse_box_list(text: str) -> list[list[int]] | None:
  """`[[x1, y1, x2, y2], ...]` -> list of 4-int lists; None when `text` is not exactly such a list."""
  s = text.strip()
  if len(s) < 2 or s[0] != "[" or s[-1] != "]":
    return None
  inner, pos, boxes = s[1:-1], 0, []
  while True:
    pos = _SEP.match(inner, pos).end() if boxes else len(inner) - len(inner.lstrip())
    if pos >= len(inner):
      return boxes
    m = _BOX.match(inner, pos)
    if not m:
      return None
    boxes.append([int(g) for g in m.groups()])
    pos = m.end()


def to_pixels(box: list[int], width: int, height: int) -> list[int]:
  x1, y1, x2, y2 = box
  return [int(x1 / GRID_MAX * width), int(y1 / GRID_MAX * height), int(x2 / GRID_MAX * width),
          int(y2 / GRID_MAX * height)]


def parse_grounding(text: str, image_size: tuple[int, int] | None) -> list[GroundingSpan]:
  """Every well-formed span in `text`, in order. `image_size` = (W, H) of the original image, or None."""
  spans = []
  for m in _SPAN.finditer(text):
    boxes = parse_box_list(m.group(2))
    if boxes is None:
      continue
    grid = [[min(max(v, 0), GRID_MAX) for v in b] for b in boxes]
    pixels = None if image_size is None else [to_pixels(b, *image_size) for b in grid]
    spans.append(GroundingSpan(label=m.group(1).strip(), boxes_normalized=grid, boxes=pixels))
  return spans
