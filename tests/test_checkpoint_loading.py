"""Loading the released layout: single file, shards + index, and errors that name every bad tensor."""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import GOLDEN_DIR
from dsocr_jax.checkpoint import hf, keymap, safetensors_io
from dsocr_jax.config import load_config


def _golden_tensors():
  f = safetensors_io.SafetensorsFile(os.path.join(GOLDEN_DIR, "model.safetensors"))
  return {k: np.array(f.get(k)) for k in f.keys()}


def _write_dir(path, tensors):
  os.makedirs(path, exist_ok=True)
  shutil.copy(os.path.join(GOLDEN_DIR, "config.json"), path / "config.json")
  shutil.copy(os.path.join(GOLDEN_DIR, "tokenizer.json"), path / "tokenizer.json")
  safetensors_io.save(tensors, str(path / "model.safetensors"))
  return path


def test_golden_layout_loads_full_tree():
  cfg = load_config(GOLDEN_DIR)
  tree = hf.load_params(GOLDEN_DIR, cfg)
  assert set(tree) == {"sam_model", "vision_model", "projector", "image_newline", "view_seperator", "decoder"}
  f = safetensors_io.SafetensorsFile(os.path.join(GOLDEN_DIR, "model.safetensors"))
  # Transposed linear, split fused qkv, stacked experts: compare with the raw tensors.
  q = tree["decoder"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
  np.testing.assert_array_equal(q, f.get("model.layers.0.self_attn.q_proj.weight").T)
  c = cfg.sam.width
  qkv = f.get("model.sam_model.blocks.0.attn.qkv.weight")
  np.testing.assert_array_equal(tree["sam_model"]["blocks"][0]["attn"]["k"]["kernel"], qkv[c:2 * c].T)
  up = tree["decoder"]["layers"][2]["mlp"]["experts"]["up_proj"]
  assert up.shape == (8, 64, 32)
  np.testing.assert_array_equal(up[5], f.get("model.layers.2.mlp.experts.5.up_proj.weight").T)
  conv = tree["sam_model"]["net_2"]["kernel"]
  np.testing.assert_array_equal(conv, f.get("model.sam_model.net_2.weight").transpose(2, 3, 1, 0))


def test_sharded_layout_with_index(tmp_path):
  tensors = _golden_tensors()
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
  weight_map = {}
  for shard, keys in shards.items():
    safetensors_io.save({k: tensors[k] for k in keys}, str(tmp_path / shard))
    weight_map.update({k: shard for k in keys})
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  shutil.copy(os.path.join(GOLDEN_DIR, "config.json"), tmp_path / "config.json")
  tree = hf.load_params(str(tmp_path))
  ref = hf.load_params(GOLDEN_DIR)
  np.testing.assert_array_equal(tree["decoder"]["lm_head"]["kernel"], ref["decoder"]["lm_head"]["kernel"])
  # A shard named by the index but absent.
  os.remove(tmp_path / "model-00002-of-00002.safetensors")
  with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
    hf.load_params(str(tmp_path))


def test_missing_wrong_shape_and_unexpected_tensors_are_all_named(tmp_path):
  tensors = _golden_tensors()
  del tensors["model.layers.1.mlp.experts.3.down_proj.weight"]
  tensors["model.sam_model.blocks.2.attn.proj.weight"] = np.zeros((32, 31), np.float32)
  tensors["model.layers.0.mlp.extra.weight"] = np.zeros((4,), np.float32)
  _write_dir(tmp_path, tensors)
  with pytest.raises(ValueError) as e:
    hf.load_params(str(tmp_path))
  msg = str(e.value)
  assert "3 problem(s)" in msg
  assert "missing: model.layers.1.mlp.experts.3.down_proj.weight (expected shape [64, 32])" in msg
  assert "wrong shape: model.sam_model.blocks.2.attn.proj.weight: expected [32, 32], found [32, 31]" in msg
  assert "unexpected: model.layers.0.mlp.extra.weight (shape [4])" in msg


@pytest.mark.parametrize("mutation", ["missing", "shape", "extra"])
def test_each_single_problem_is_named(tmp_path, mutation):
  tensors = _golden_tensors()
  name = "model.vision_model.transformer.layers.1.mlp.fc2.weight"
  if mutation == "missing":
    del tensors[name]
  elif mutation == "shape":
    tensors[name] = np.zeros((64, 255), np.float32)
  else:
    name = "model.vision_model.post_layernorm.weight"  # the unreleased port expects it; the checkpoint has none
    tensors[name] = np.ones((64,), np.float32)
  _write_dir(tmp_path, tensors)
  with pytest.raises(ValueError, match=name.replace(".", r"\.")):
    hf.load_params(str(tmp_path))


def test_truncated_file_is_reported(tmp_path):
  _write_dir(tmp_path, _golden_tensors())
  path = tmp_path / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match="truncated"):
    hf.load_params(str(tmp_path))


def test_unused_tensors_are_optional(tmp_path):
  tensors = _golden_tensors()
  for name in keymap.OPTIONAL_UNUSED:
    tensors.pop(name, None)
  _write_dir(tmp_path, tensors)
  assert "decoder" in hf.load_params(str(tmp_path))
