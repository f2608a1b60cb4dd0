"""Training config, JSONL data, batching and text metrics: no model involved."""

import json
import logging
import math
import os

import numpy as np
import pytest
from PIL import Image

from dsocr_jax.metrics_text import cer, edit_distance, wer
from train import config as config_lib
from train import data as data_lib
from train import loss as losses
from train.__main__ import main as train_main

from conftest import GOLDEN_DIR

TOKENIZER = os.path.join(GOLDEN_DIR, "tokenizer.json")


# ------------------------------------------------------------------------------------------- text metrics

def test_cer_wer_hand_worked_cases():
  # kitten -> sitting: k->s, e->i, +g = 3 edits over 6 reference characters.
  assert edit_distance("kitten", "sitting") == 3
  assert cer("kitten", "sitting") == pytest.approx(3 / 6)
  assert cer("abc", "abc") == 0.0
  assert cer("abc", "") == 1.0  # three deletions / 3
  assert cer("", "xy") == 2.0  # empty reference counts as length 1: two insertions
  # Corpus rate sums edits and lengths: (1 + 0) / (3 + 2), not the mean of 1/3 and 0.
  assert cer(["abc", "de"], ["abd", "de"]) == pytest.approx(1 / 5)
  # "the cat sat" -> "the cat sit on": one substitution, one insertion over 3 words.
  assert wer("the cat sat", "the cat sit on") == pytest.approx(2 / 3)
  assert wer("a b", "b") == pytest.approx(1 / 2)
  with pytest.raises(ValueError, match="references"):
    cer(["a"], ["a", "b"])


# ------------------------------------------------------------------------------------------- loss

def test_masked_loss_equals_hand_computed_value():
  logits = np.array([
      [[2.0, 0.5, -1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 3.0]],
      [[0.3, -0.2, 0.1], [-1.0, 2.0, 0.5], [0.0, 0.0, 0.0]],
  ], np.float32)
  targets = np.array([[1, 2, 0], [0, 1, 2]])
  mask = np.array([[False, True, True], [True, True, False]])
  # By hand: -log softmax at the three+two counted positions.
  def nll(row, target):
    return math.log(sum(math.exp(v) for v in row)) - row[target]
  counted = [nll([0.0, 1.0, 0.0], 2), nll([1.0, 1.0, 3.0], 0), nll([0.3, -0.2, 0.1], 0), nll([-1.0, 2.0, 0.5], 1)]
  expected = sum(counted) / 4
  got = float(losses.masked_cross_entropy(logits, targets, mask))
  assert got == pytest.approx(expected, abs=1e-6)
  total, count = losses.cross_entropy_sum(logits, targets, mask)
  assert float(count) == 4 and float(total) == pytest.approx(sum(counted), abs=1e-5)


# ------------------------------------------------------------------------------------------- config

def test_config_rejects_bad_keys_and_values():
  with pytest.raises(ValueError, match=r"optim\.lrr: unknown key"):
    config_lib.load(None, ["optim.lrr=1"])
  with pytest.raises(ValueError, match=r"optim\.lr: expected a number"):
    config_lib.load(None, ["optim.lr=fast"])
  with pytest.raises(ValueError, match=r"model\.freeze"):
    config_lib.load(None, ["model.freeze=[retina]"])
  cfg = config_lib.load(None, ["optim.lr=3e-4", "model.freeze=[sam,clip]", "data.buckets=[64,128]"])
  assert cfg.optim.lr == 3e-4 and cfg.model.freeze == ("sam", "clip") and cfg.data.buckets == (64, 128)


def test_cli_bad_config_is_one_line_and_nonzero(tmp_path, capsys):
  rc = train_main(["--config", os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_cpu.yaml"),
                   "--workdir", str(tmp_path), "data.batch_size=zero"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc != 0
  assert err[-1].startswith("error: config: data.batch_size: expected an integer")


# ------------------------------------------------------------------------------------------- JSONL

def _write_jsonl(tmp_path, lines):
  Image.new("RGB", (80, 40), "white").save(tmp_path / "a.png")
  path = tmp_path / "train.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return str(path)


GOOD = json.dumps({"image": "a.png", "prompt": "<image>\nFree OCR.", "answer": "hi"})


def test_malformed_jsonl_line_is_reported_with_its_number(tmp_path, caplog):
  path = _write_jsonl(tmp_path, [GOOD, GOOD, '{"image": "a.png", "answer": ', GOOD,
                                 json.dumps({"image": "missing.png", "answer": "x"})])
  cfg = config_lib.load(None, ["data.bad_lines=skip"]).data
  with caplog.at_level(logging.WARNING):
    records = data_lib.read_jsonl(path, cfg)
  assert len(records) == 3
  assert "skipped 2 malformed line(s)" in caplog.text and "train.jsonl:3: not valid JSON" in caplog.text
  strict = config_lib.load(None, ["data.bad_lines=fail"]).data
  with pytest.raises(ValueError, match=r"train\.jsonl:3: not valid JSON"):
    data_lib.read_jsonl(path, strict)
  with pytest.raises(ValueError, match=r"train\.jsonl:2: prompt: holds 0 <image> marker"):
    data_lib.read_jsonl(_write_jsonl(tmp_path, [GOOD, json.dumps({"image": "a.png", "prompt": "x", "answer": "y"})]),
                        strict)


def test_batches_mask_answer_and_eos_only_and_resume_by_state(tmp_path):
  path = _write_jsonl(tmp_path, [json.dumps({"image": "a.png", "answer": a}) for a in ("ab", "cde", "f", "gh")])
  cfg = config_lib.load(None, ["data.batch_size=2", "data.buckets=[32,64]", "data.image_size=64"]).data
  ds = data_lib.dataset(data_lib.read_jsonl(path, cfg), cfg, TOKENIZER, train=True)
  it = iter(ds)
  batch = next(it)
  a = batch.arrays
  assert a["input_ids"].shape == (2, 32)  # 1 BOS + 7 image tokens + 11 prompt tokens + answer + EOS fits 32
  for row, answer in enumerate(batch.answers):
    # Counted predictions are exactly the answer bytes (id = byte + 3 in the toy tokenizer) then EOS (1).
    assert list(a["targets"][row][a["loss_mask"][row]]) == [ord(c) + 3 for c in answer] + [1]
    assert a["images_seq_mask"][row].sum() == 1 * 2 + 1  # 64 px view: a 1x1 grid + its newline + the separator
  state = it.get_state()
  expected = next(it).answers
  resumed = data_lib.iterate(ds, state)
  assert next(resumed).answers == expected
