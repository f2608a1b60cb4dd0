"""Config loading (hub format), validation errors naming the key, presets against the spec's numbers."""

import json
import os

import numpy as np
import pytest

from conftest import GOLDEN_DIR
from dsocr_jax.checkpoint import keymap
from dsocr_jax.config import from_hub_dict, get_mode, load_config, preset, to_hub_dict


def _golden_raw():
  with open(os.path.join(GOLDEN_DIR, "config.json")) as f:
    return json.load(f)


def test_golden_config_dimensions():
  cfg = load_config(GOLDEN_DIR)
  # Values from ../shared/golden/README.md "Model dimensions".
  assert (cfg.sam.width, cfg.sam.depth, cfg.sam.heads, cfg.sam.global_attn_indexes) == (32, 4, 2, (1, 3))
  assert (cfg.sam.out_chans, cfg.sam.downsample_channels) == (16, (32, 64))
  assert (cfg.clip.width, cfg.clip.layers, cfg.clip.heads, cfg.clip.ffn_hidden_size) == (64, 2, 4, 256)
  assert (cfg.projector.input_dim, cfg.projector.n_embed) == (128, 64)
  d = cfg.decoder
  assert (d.hidden_size, d.num_hidden_layers, d.num_attention_heads, d.head_dim) == (64, 3, 4, 16)
  assert (d.intermediate_size, d.moe_intermediate_size, d.n_routed_experts, d.num_experts_per_tok) == (128, 32, 8, 2)
  assert (d.shared_intermediate_size, d.vocab_size, d.first_k_dense_replace) == (64, 1024, 1)


def test_real_preset_matches_spec():
  cfg = preset("deepseek-ocr")
  d = cfg.decoder
  # Spec section 3 and 2.
  assert (d.vocab_size, d.hidden_size, d.num_hidden_layers, d.num_attention_heads, d.head_dim) == (
      129280, 1280, 12, 10, 128)
  assert (d.intermediate_size, d.moe_intermediate_size, d.n_routed_experts, d.n_shared_experts,
          d.num_experts_per_tok, d.shared_intermediate_size) == (6848, 896, 64, 2, 6, 1792)
  assert (cfg.sam.width, cfg.sam.depth, cfg.sam.global_attn_indexes, cfg.clip.width, cfg.clip.layers) == (
      768, 12, (2, 5, 8, 11), 1024, 24)
  # Spec 6.5: 2,710 tensors and 3,336,106,240 parameters, of which CLIP's unused patch conv is one tensor
  # of 602,112 parameters (accepted, never loaded).
  sources = keymap.source_shapes(keymap.manifest(cfg))
  assert len(sources) + 1 == 2710
  assert sum(int(np.prod(s)) for s in sources.values()) + 602_112 == 3_336_106_240


def test_round_trip_hub_dict():
  cfg = load_config(GOLDEN_DIR)
  assert from_hub_dict(to_hub_dict(cfg)) == cfg


@pytest.mark.parametrize("path,value,key", [
    (("hidden_size",), 66, "num_attention_heads"),            # not divisible by the 4 heads
    (("num_experts_per_tok",), 9, "num_experts_per_tok"),      # more than the 8 experts
    (("vocab_size",), -1, "vocab_size"),
    (("num_attention_heads",), "4", "num_attention_heads"),    # wrong type
    (("tile_tag",), "1D", "tile_tag"),
    (("use_mla",), True, "use_mla"),
    (("scoring_func",), "sigmoid", "scoring_func"),
    (("projector_config", "input_dim"), 100, "projector_config.input_dim"),
    (("vision_config", "width", "sam_vit_b", "global_attn_indexes"), [1, 7], "global_attn_indexes"),
    (("vision_config", "width", "sam_vit_b", "downsample_channels"), [32, 48], "downsample_channels"),
])
def test_invalid_value_names_the_key(path, value, key):
  raw = _golden_raw()
  node = raw
  for p in path[:-1]:
    node = node[p]
  node[path[-1]] = value
  if path == ("hidden_size",):
    raw["language_config"]["hidden_size"] = value
    raw["projector_config"]["n_embed"] = value
  if path in (("num_experts_per_tok",), ("vocab_size",), ("num_attention_heads",)):
    raw["language_config"][path[0]] = value
  with pytest.raises(ValueError, match=key):
    from_hub_dict(raw)


def test_contradictory_top_level_and_language_config():
  raw = _golden_raw()
  raw["language_config"]["num_hidden_layers"] = 5
  with pytest.raises(ValueError, match="num_hidden_layers.*language_config"):
    from_hub_dict(raw)


def test_missing_and_malformed_config_file(tmp_path):
  with pytest.raises(ValueError, match="no config.json"):
    load_config(tmp_path)
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    load_config(tmp_path)


def test_modes_match_spec_table():
  # Spec 4.1: (base, image, crop) and the placeholder count per global view n*(n+1)+1.
  expected = {"tiny": (512, 512, False, 73), "small": (640, 640, False, 111), "base": (1024, 1024, False, 273),
              "large": (1280, 1280, False, 421), "gundam": (1024, 640, True, 273), "gundam-m": (1280, 1024, True, 421)}
  for name, (base, image, crop, tokens) in expected.items():
    m = get_mode(name)
    n = m.global_grid
    assert (m.base_size, m.image_size, m.crop_mode, n * (n + 1) + 1) == (base, image, crop, tokens)
  with pytest.raises(ValueError, match="mode"):
    get_mode("huge")
