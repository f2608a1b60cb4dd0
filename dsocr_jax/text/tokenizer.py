"""The checkpoint's tokenizer (HF `tokenizers` JSON), special ids looked up by their strings, streaming decode.

DeepSeek-OCR ships a byte-level BPE `tokenizer.json` (spec 5.3). Special ids differ between tokenizers (the
released `<image>` is 128815, the golden toy vocabulary's is 1000), so every id is looked up by its string here
and nowhere else is one hard-coded. Encoding never adds BOS/EOS (the official processor adds BOS itself, spec
4.5); special-token strings inside the text (`<|grounding|>`, `<|ref|>`, ...) become their ids, as with the
official `tokenizer.encode(..., add_special_tokens=False)`.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from typing import Sequence

import tokenizers

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
IMAGE_TOKEN = "<image>"
REPLACEMENT_CHAR = "\ufffd"  # what byte-level decoding yields for an incomplete UTF-8 sequence
_MAX_HELD_BACK = 3  # a UTF-8 character has at most 4 bytes, so an incomplete one spans at most 3 trailing tokens


@dataclasses.dataclass(frozen=True)
class StreamState:
  """Where streaming decode stands: ids[prefix_offset:read_offset] is the already-emitted context window and
  ids[read_offset:] has not been emitted yet."""
  prefix_offset: int = 0
  read_offset: int = 0


def _token_string(value) -> str | None:
  # tokenizer_config.json writes special tokens either as a string or as an AddedToken dict.
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


class Tokenizer:
  """Thin wrapper over `tokenizers.Tokenizer` with the ids the model needs."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN,
               pad_token: str | None = PAD_TOKEN, image_token: str = IMAGE_TOKEN):
    self._tok = tokenizer
    self.image_token = image_token
    self._bos = self._require(bos_token, "bos_token")
    self._eos = self._require(eos_token, "eos_token")
    self._image = self._require(image_token, "image_token")
    self._pad = None if pad_token is None else self.token_id(pad_token)
    self._vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

  def _require(self, token: str, field: str) -> int:
    token_id = self.token_id(token)
    if token_id is None:
      raise ValueError(f"tokenizer: {field} {token!r} is not in the vocabulary")
    return token_id

  # ------------------------------------------------------------------------------------------- construction

  @classmethod
  def from_file(cls, path: str | os.PathLike, **special_tokens) -> "Tokenizer":
    """Loads a `tokenizer.json` file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise ValueError(f"tokenizer: no tokenizer file at {path}")
    try:
      tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
      raise ValueError(f"tokenizer: cannot load {path}: {e}") from None
    return cls(tok, **special_tokens)

  @classmethod
  def from_checkpoint(cls, directory: str | os.PathLike) -> "Tokenizer":
    """Loads `<dir>/tokenizer.json`, taking the BOS/EOS/PAD strings from `tokenizer_config.json` when present."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
      raise ValueError(f"tokenizer: checkpoint directory {directory} does not exist")
    special: dict[str, str | None] = {}
    config_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config_path):
      try:
        with open(config_path, encoding="utf-8") as f:
          config = json.load(f)
      except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"tokenizer: cannot read {config_path}: {e}") from None
      for key in ("bos_token", "eos_token", "pad_token"):
        value = _token_string(config.get(key))
        if value is not None:
          special[key] = value
    return cls.from_file(os.path.join(directory, "tokenizer.json"), **special)

  # ----------------------------------------------------------------------------------------------- ids

  def token_id(self, token: str) -> int | None:
    """The id of a token string (special or not), or None when the vocabulary lacks it."""
    return self._tok.token_to_id(token)

  @property
  def bos_id(self) -> int:
    return self._bos

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def pad_id(self) -> int | None:
    return self._pad

  @property
  def image_id(self) -> int:
    return self._image

  @property
  def vocab_size(self) -> int:
    """Ids the tokenizer knows (base + added). The model's embedding table may be larger (129280 vs ~128.8k)."""
    return self._vocab_size

  # -------------------------------------------------------------------------------------- encode / decode

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` without BOS/EOS; special-token strings in the text map to their ids."""
    if not isinstance(text, str):
      raise ValueError(f"text: expected a string, got {type(text).__name__}")
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def _window(self, ids: Sequence[int], state: StreamState, end: int, skip: bool) -> tuple[str, str]:
    """(text of the emitted context window, text of that window plus the unemitted ids up to `end`)."""
    prefix_text = self.decode(ids[state.prefix_offset:state.read_offset], skip_special_tokens=skip)
    return prefix_text, self.decode(ids[state.prefix_offset:end], skip_special_tokens=skip)

  def decode_incremental(self, ids: Sequence[int], state: StreamState | None = None, *,
                         skip_special_tokens: bool = False) -> tuple[str, StreamState]:
    """New text since `state`, emitted only at complete characters; returns (text, new state).

    `ids` is the whole stream so far (only ids[state.prefix_offset:] is read). Byte-level BPE can split one
    character over several tokens, and some decoders render a piece differently depending on what precedes it,
    so we decode a short window (the last emitted tokens plus the new ones) and emit the difference to the
    text of the emitted part. When the window ends in an incomplete UTF-8 sequence (a trailing U+FFFD), the
    last 1-3 ids are held back (a character has at most 4 bytes). Cost per call is O(window), not O(all ids).
    `finish_incremental` flushes a tail that never completed.
    """
    state = state or StreamState()
    for end in range(len(ids), max(state.read_offset, len(ids) - _MAX_HELD_BACK - 1), -1):
      prefix_text, full_text = self._window(ids, state, end, skip_special_tokens)
      if full_text.endswith(REPLACEMENT_CHAR) or len(full_text) < len(prefix_text):
        continue
      if len(full_text) == len(prefix_text):
        # The new ids render as nothing (e.g. skipped special tokens): consume them, keep the context window.
        return "", StreamState(state.prefix_offset, end)
      return full_text[len(prefix_text):], StreamState(state.read_offset, end)
    return "", state

  def finish_incremental(self, ids: Sequence[int], state: StreamState | None = None, *,
                         skip_special_tokens: bool = False) -> str:
    """Whatever `decode_incremental` held back (e.g. a truncated character, rendered as U+FFFD)."""
    prefix_text, full_text = self._window(ids, state or StreamState(), len(ids), skip_special_tokens)
    return full_text[len(prefix_text):]


class IncrementalDecoder:
  """One output stream: `add(ids)` returns the new text, `finish()` the held-back tail.

  Keeps only the ids of the current decode window, so memory and time per token stay constant.
  """

  def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False):
    self._tokenizer = tokenizer
    self._skip = skip_special_tokens
    self._ids: list[int] = []
    self._state = StreamState()

  def add(self, ids: int | Sequence[int]) -> str:
    self._ids.extend([int(ids)] if isinstance(ids, numbers.Integral) else [int(i) for i in ids])
    text, state = self._tokenizer.decode_incremental(self._ids, self._state, skip_special_tokens=self._skip)
    drop = state.prefix_offset  # ids before the window are never read again
    del self._ids[:drop]
    self._state = StreamState(0, state.read_offset - drop)
    return text

  def finish(self) -> str:
    text = self._tokenizer.finish_incremental(self._ids, self._state, skip_special_tokens=self._skip)
    self._ids.clear()
    self._state = StreamState()
    return text
