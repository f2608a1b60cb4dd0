"""The model `python -m serve` runs without `--checkpoint`: a deterministic random-init tiny DeepSeek-OCR.

It exists so the server can be started, probed and load-tested anywhere without downloading weights. Its output
is meaningless text; the server announces it as such in the log and as the model id `dsocr-random-tiny`.
Architecture and image geometry are the real ones at the `tiny` preset's widths (configs/tiny.json).

The tokenizer is byte-level, built here with the `tokenizers` library: every UTF-8 byte is one token, plus the
special tokens DeepSeek-OCR prompts and outputs use, and placeholder tokens `<tokN>` for the rest of the
embedding table so that every id the model can emit decodes.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx

from dsocr_jax.config import ModelConfig, preset
from dsocr_jax.text.tokenizer import BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN, Tokenizer

MODEL_ID = "dsocr-random-tiny"
DESCRIPTION = "embedded random-init tiny DeepSeek-OCR (configs/tiny.json, seed 0): NOT a trained model"

# (token, special): special tokens are dropped by skip_special_tokens; the table-cell tags are kept as text.
SPECIAL_TOKENS = [(BOS_TOKEN, True), (EOS_TOKEN, True), (PAD_TOKEN, True)]
BYTE_OFFSET = len(SPECIAL_TOKENS)  # byte b has id b + 3, as in the golden toy vocabulary
EXTRA_TOKENS = [(IMAGE_TOKEN, True), ("<|grounding|>", True), ("<|ref|>", True), ("<|/ref|>", True),
                ("<|det|>", True), ("<|/det|>", True), ("<|User|>", True), ("<|Assistant|>", True),
                ("<td>", False), ("</td>", False), ("<tr>", False), ("</tr>", False)]


def _added(token_id: int, content: str, special: bool) -> dict:
  return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
          "normalized": False, "special": special}


def byte_level_tokenizer(vocab_size: int) -> Tokenizer:
  """Byte-level tokenizer over `vocab_size` ids: 0-2 BOS/EOS/PAD, 3-258 the bytes, then the extra tokens,
  then `<tokN>` placeholders up to vocab_size - 1."""
  alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: _byte_of(ch))
  vocab = {ch: i + BYTE_OFFSET for i, ch in enumerate(alphabet)}
  first_extra = BYTE_OFFSET + len(vocab)
  if vocab_size < first_extra + len(EXTRA_TOKENS):
    raise ValueError(f"vocab_size: {vocab_size} is too small for a byte-level vocabulary "
                     f"({first_extra + len(EXTRA_TOKENS)} ids needed)")
  added = [_added(i, t, s) for i, (t, s) in enumerate(SPECIAL_TOKENS)]
  added += [_added(first_extra + i, t, s) for i, (t, s) in enumerate(EXTRA_TOKENS)]
  added += [_added(i, f"<tok{i}>", True) for i in range(first_extra + len(EXTRA_TOKENS), vocab_size)]
  # Added tokens must also sit in the model vocabulary, or `tokenizers` renumbers them after it.
  vocab.update({a["content"]: a["id"] for a in added})
  spec = {
      "version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
      "added_tokens": added,
      "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
      "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
      "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                "vocab": vocab, "merges": []},
  }
  return Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)))


def _byte_of(ch: str) -> int:
  """The byte that the GPT-2 byte-level alphabet maps to `ch` (printable bytes map to themselves)."""
  return _BYTE_OF_CHAR[ch]


def _gpt2_byte_table() -> dict[str, int]:
  printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
      list(range(ord("®"), ord("ÿ") + 1))
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[chr(b)] = b
    else:
      chars[chr(256 + extra)] = b
      extra += 1
  return chars


_BYTE_OF_CHAR = _gpt2_byte_table()


def random_params(abstract_state: dict, seed: int) -> dict:
  """A parameter tree for `abstract_state` (shapes only) drawn with numpy: norm scales 1, biases 0, every other
  float N(0, 0.02) like `layers.default_init`. Host-side numpy takes well under a second where building the
  module with its own JAX initialisers dispatches thousands of small ops (tens of seconds on a loaded CPU)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    dtype = np.dtype(leaf.dtype)
    if not np.issubdtype(dtype, np.floating):
      return np.zeros(leaf.shape, dtype)
    if name == "scale":
      return np.ones(leaf.shape, np.float32)
    if name == "bias":
      return np.zeros(leaf.shape, np.float32)
    return (rng.standard_normal(leaf.shape, dtype=np.float32) * np.float32(0.02))

  return jax.tree_util.tree_map_with_path(fill, abstract_state)


def build_default_model(*, dtype=jnp.float32, seed: int = 0) -> tuple[object, ModelConfig, Tokenizer]:
  """(DeepseekOCR with random weights, its config, its tokenizer). Deterministic for a given seed."""
  from dsocr_jax.model import params
  from dsocr_jax.model.ocr import DeepseekOCR
  cfg = preset("tiny")

  def ctor():
    return DeepseekOCR(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed))

  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(ctor)))
  model = params.from_tree(ctor, random_params(abstract, seed), dtype=dtype)
  return model, cfg, byte_level_tokenizer(cfg.decoder.vocab_size)
