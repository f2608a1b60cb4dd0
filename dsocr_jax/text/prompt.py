"""Prompt text + preprocessed images -> decoder input ids with `<image>` placeholders expanded (spec 4.5, 5.1).

The official inference uses the PLAIN format: no role tags, no chat template; the user text is the whole prompt,
e.g. `<image>\\n<|grounding|>Convert the document to markdown.`. The text is split at `<image>`, each piece is
tokenised separately without special tokens, and

    input_ids = [BOS] + ids(piece 0) + [image_id] * N_1 + ids(piece 1) + ... + [image_id] * N_k + ids(piece k)

with N_i the placeholder count of image i and no EOS. The vision features later overwrite the embeddings at the
placeholder positions in order (`images_seq_mask`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from dsocr_jax.image.preprocess import PreprocessedImage
from dsocr_jax.text.tokenizer import Tokenizer


@dataclasses.dataclass
class Prompt:
  input_ids: np.ndarray  # int32 [T]
  images_seq_mask: np.ndarray  # bool [T]: True exactly at the image placeholder positions
  images: list[PreprocessedImage]

  def __len__(self) -> int:
    return int(self.input_ids.shape[0])

  @property
  def num_image_tokens(self) -> int:
    return int(self.images_seq_mask.sum())

  @property
  def images_spatial_crop(self) -> np.ndarray:
    """[n_images, 2] int32 (w_tiles, h_tiles), as the official processor's `images_spatial_crop`."""
    return np.asarray([im.spatial_crop for im in self.images], np.int32).reshape(len(self.images), 2)


def plain_format(contents: Sequence[str]) -> str:
  """The hub's PLAIN conversation format (spec 5.1): message contents, each stripped, concatenated with no
  separator and no role tags, and the result stripped."""
  return "".join(c.strip() for c in contents).strip()


def build_prompt(text: str, images: Sequence[PreprocessedImage], tokenizer: Tokenizer, *,
                 strip: bool = False) -> Prompt:
  """Tokenises `text`, expanding its i-th `<image>` into images[i].num_tokens placeholder ids.

  `strip=True` applies the hub `infer` behaviour (PLAIN + `.strip()`, spec 8.5); the default keeps the text
  verbatim like the vLLM path. Raises ValueError when the number of `<image>` markers differs from len(images).
  """
  if not isinstance(text, str):
    raise ValueError(f"text: expected a string, got {type(text).__name__}")
  if strip:
    text = text.strip()
  pieces = text.split(tokenizer.image_token)
  if len(pieces) - 1 != len(images):
    raise ValueError(f"images: the prompt has {len(pieces) - 1} {tokenizer.image_token} placeholder(s) "
                     f"but {len(images)} image(s) were given")
  ids: list[int] = [tokenizer.bos_id]
  mask: list[bool] = [False]
  for i, piece in enumerate(pieces):
    if i > 0:
      n = images[i - 1].num_tokens
      ids.extend([tokenizer.image_id] * n)
      mask.extend([True] * n)
    piece_ids = tokenizer.encode(piece) if piece else []
    ids.extend(piece_ids)
    mask.extend([False] * len(piece_ids))
  return Prompt(input_ids=np.asarray(ids, np.int32), images_seq_mask=np.asarray(mask, bool), images=list(images))
