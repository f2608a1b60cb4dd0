"""Tokenizer (golden toy vocabulary) and prompt building against the golden processor outputs."""

import json
import os

import numpy as np
import pytest
import tokenizers
from PIL import Image

from conftest import case_id, golden_cases
from dsocr_jax.image.decode import open_image
from dsocr_jax.image.preprocess import preprocess
from dsocr_jax.text.prompt import build_prompt, plain_format
from dsocr_jax.text.tokenizer import IncrementalDecoder, StreamState, Tokenizer


@pytest.fixture(scope="module")
def tok(golden_dir):
  return Tokenizer.from_checkpoint(golden_dir)


@pytest.fixture(scope="module")
def small_image():
  return preprocess(Image.new("RGB", (32, 32), (255, 255, 255)), "small")  # 111 placeholders


# ------------------------------------------------------------------------------------------------- golden


@pytest.mark.parametrize("case", golden_cases(), ids=case_id)
def test_golden_prompt_matches_official(case, golden_dir, tok):
  g = np.load(case)
  image = preprocess(open_image(os.path.join(golden_dir, str(g["image_file"]))), str(g["mode"]),
                     min_crops=int(g["min_crops"]), max_crops=int(g["max_crops"]))
  prompt = build_prompt(str(g["prompt"]), [image], tok)
  assert prompt.input_ids.dtype == np.int32 and prompt.images_seq_mask.dtype == np.bool_
  np.testing.assert_array_equal(prompt.input_ids, g["input_ids"])
  np.testing.assert_array_equal(prompt.images_seq_mask, g["images_seq_mask"])
  np.testing.assert_array_equal(prompt.images_spatial_crop, g["images_spatial_crop"])
  assert prompt.num_image_tokens == int(g["num_image_tokens"])


def test_golden_free_ocr_suffix_ids(tok):
  # Golden README: encoding "\nFree OCR." gives the ids after the image tokens; byte b -> id b + 3.
  assert tok.encode("\nFree OCR.") == [b + 3 for b in b"\nFree OCR."]


# ---------------------------------------------------------------------------------------------- tokenizer


def test_golden_special_ids_are_looked_up_by_string(tok):
  # Ids from the golden README's table.
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.image_id) == (0, 1, 2, 1000)
  expected = {"<|grounding|>": 1001, "<|ref|>": 1002, "<|/ref|>": 1003, "<|det|>": 1004, "<|/det|>": 1005,
              "<|User|>": 1006, "<|Assistant|>": 1007}
  assert {t: tok.token_id(t) for t in expected} == expected
  assert tok.token_id("<no such token>") is None
  assert tok.vocab_size == 1024


def test_special_strings_in_text_become_ids(tok):
  assert tok.encode("<|ref|>a<|/ref|>") == [1002, ord("a") + 3, 1003]


@pytest.mark.parametrize("text", ["Free OCR.", "héllo, 日本語 ✓ \U0001F600\n\ttabs", ""])
def test_round_trip(tok, text):
  assert tok.decode(tok.encode(text)) == text


def test_decode_skips_special_tokens_on_request(tok):
  ids = tok.encode("<|det|>x<|/det|>") + [tok.eos_id]
  assert tok.decode(ids) == "<|det|>x<|/det|><｜end▁of▁sentence｜>"
  assert tok.decode(ids, skip_special_tokens=True) == "x"


def test_missing_files_raise_value_error(tmp_path):
  with pytest.raises(ValueError, match="tokenizer"):
    Tokenizer.from_file(tmp_path / "tokenizer.json")
  with pytest.raises(ValueError, match="tokenizer"):
    Tokenizer.from_checkpoint(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="tokenizer"):
    Tokenizer.from_checkpoint(tmp_path)  # directory exists but has no tokenizer.json
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(ValueError, match="tokenizer"):
    Tokenizer.from_file(tmp_path / "tokenizer.json")


def test_missing_image_token_raises_value_error(golden_dir):
  raw = tokenizers.Tokenizer.from_file(os.path.join(golden_dir, "tokenizer.json"))
  with pytest.raises(ValueError, match="image_token"):
    Tokenizer(raw, image_token="<img>")


def test_tokenizer_config_names_the_special_tokens(golden_dir, tmp_path):
  # A config whose eos_token (AddedToken dict form) names another string makes that the EOS.
  with open(os.path.join(golden_dir, "tokenizer.json"), "rb") as f:
    (tmp_path / "tokenizer.json").write_bytes(f.read())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|Assistant|>"}}))
  assert Tokenizer.from_checkpoint(tmp_path).eos_id == 1007


# ---------------------------------------------------------------------------------------- streaming decode


def test_incremental_decode_waits_for_complete_characters(tok):
  ids = tok.encode("a日b")  # '日' is 3 UTF-8 bytes -> 3 byte tokens
  assert len(ids) == 5
  stream = IncrementalDecoder(tok)
  assert [stream.add(i) for i in ids] == ["a", "", "", "日", "b"]
  assert stream.finish() == ""


def test_incremental_decode_reassembles_mixed_text(tok):
  text = "<|ref|>Tïtle<|/ref|> — 数式 \U0001F600 end"
  ids = tok.encode(text) + [tok.eos_id]
  stream = IncrementalDecoder(tok)
  pieces = [stream.add(i) for i in ids]
  assert all("\ufffd" not in p for p in pieces)
  assert "".join(pieces) + stream.finish() == tok.decode(ids)


def test_incremental_decode_flushes_truncated_tail(tok):
  ids = tok.encode("ok日")[:-1]  # the last character cut after 2 of its 3 bytes
  text, state = tok.decode_incremental(ids)
  assert text == "ok" and state == StreamState(0, 2)
  assert tok.finish_incremental(ids, state) == "\ufffd"


def test_incremental_decode_with_skipped_specials(tok):
  ids = tok.encode("<|det|>ab<|/det|>")
  stream = IncrementalDecoder(tok, skip_special_tokens=True)
  assert "".join(stream.add(i) for i in ids) + stream.finish() == "ab"


# ------------------------------------------------------------------------------------------------- prompts


def test_prompt_layout_by_hand(tok, small_image):
  # [BOS] + ids("A") + 111 x image + ids("\nB"); no EOS.
  prompt = build_prompt("A<image>\nB", [small_image], tok)
  expected = [0, ord("A") + 3] + [1000] * 111 + [ord("\n") + 3, ord("B") + 3]
  assert prompt.input_ids.tolist() == expected
  assert prompt.images_seq_mask.tolist() == [i == 1000 for i in expected]
  assert len(prompt) == 115 and prompt.num_image_tokens == 111


def test_prompt_with_two_images_keeps_order(tok, small_image):
  tiled = preprocess(Image.new("RGB", (1300, 700)), "gundam")
  assert tiled.num_tokens != small_image.num_tokens
  prompt = build_prompt("<image><image>x", [tiled, small_image], tok)
  n1, n2 = tiled.num_tokens, small_image.num_tokens
  assert prompt.input_ids.tolist() == [0] + [1000] * (n1 + n2) + [ord("x") + 3]
  assert prompt.images_spatial_crop.tolist() == [list(tiled.spatial_crop), [1, 1]]


@pytest.mark.parametrize("text,n_images", [("<image>\nFree OCR.", 0), ("Free OCR.", 1),
                                           ("<image><image>", 1), ("<image>", 2)])
def test_mismatched_image_count_raises(tok, small_image, text, n_images):
  markers = text.count("<image>")
  with pytest.raises(ValueError, match=f"{markers} <image> placeholder.*{n_images} image"):
    build_prompt(text, [small_image] * n_images, tok)


def test_strip_applies_the_hub_plain_behaviour(tok, small_image):
  # OFF-HF's example prompt has a trailing space: kept verbatim by default (vLLM), dropped with strip=True (hub).
  verbatim = build_prompt("<image>\nFree OCR. ", [small_image], tok).input_ids.tolist()
  stripped = build_prompt("<image>\nFree OCR. ", [small_image], tok, strip=True).input_ids.tolist()
  assert verbatim == stripped + [ord(" ") + 3]


def test_plain_format():
  assert plain_format(["  <image>\nFree OCR.  ", "", " "]) == "<image>\nFree OCR."
  assert plain_format(["a ", " b"]) == "ab"
