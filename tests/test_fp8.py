"""FP8 (spec 9): exact blockwise dequantisation, FP8 checkpoints through the converter, FP8 weights kept in
memory, and `--fp8-export`.

Tolerances: dequantisation is exact (array_equal); logits within 1e-4 * max(1, max|ref|) of `fp8dq_logits`
(the golden decoder run with the dequantised weights), greedy ids exact.
"""

import json
import os

import ml_dtypes
import numpy as np
import pytest

from conftest import GOLDEN_DIR, case_id, golden_cases
from dsocr_jax.checkpoint import convert as convert_mod
from dsocr_jax.checkpoint import fp8, hf, keymap, orbax_io, safetensors_io
from dsocr_jax.checkpoint.load import load_model, restore_orbax_tree, state_bytes
from dsocr_jax.config import load_config
from test_convert import assert_matches_case, assert_nothing_left, golden_tensors, released_dir, run_cli

FP8_CASES = [c for c in golden_cases() if "fp8dq_logits" in np.load(c).files]
STANDALONE = os.path.join(GOLDEN_DIR, "fp8_standalone.safetensors")


def fp8_dir(path, tensors=None):
  return released_dir(path, golden_tensors("model_fp8.safetensors") if tensors is None else tensors,
                      config="config_fp8.json")


@pytest.fixture(scope="module")
def fp8_src(tmp_path_factory) -> str:
  return fp8_dir(tmp_path_factory.mktemp("fp8") / "src")


def test_golden_fp8_standalone_dequantises_exactly():
  expected = np.load(os.path.join(GOLDEN_DIR, "fp8_standalone_expected.npz"))
  src = hf.open_checkpoint(STANDALONE)
  names = [n for n in src.names() if not n.endswith(hf.SCALE_SUFFIX)]
  assert sorted(names) == ["w129x385.weight", "w300x200.weight"]
  for name in names:
    key = name.removesuffix(".weight")  # the npz names drop the suffix
    assert src.is_fp8(name)
    np.testing.assert_array_equal(src.raw(name).astype(np.float32), expected[f"{key}_fp8_as_float"])
    np.testing.assert_array_equal(src.scale(name), expected[f"{key}_scale_inv"])
    np.testing.assert_array_equal(src.read(name), expected[f"{key}_dequant"])


def test_golden_fp8_standalone_quantiser_reproduces_the_stored_bytes():
  expected = np.load(os.path.join(GOLDEN_DIR, "fp8_standalone_expected.npz"))
  f = safetensors_io.SafetensorsFile(STANDALONE)
  for name in ("w129x385.weight", "w300x200.weight"):
    q, s = fp8.quantize(expected[f"{name.removesuffix('.weight')}_original"])
    np.testing.assert_array_equal(s, f.read(name + hf.SCALE_SUFFIX))
    np.testing.assert_array_equal(q.view(np.uint8), f.read(name).view(np.uint8))


def test_power_of_two_rounding_is_exact_at_the_boundaries():
  s = np.array([1.0, 1.0000001, 0.75, 2.0 ** -20, np.nextafter(np.float32(2 ** -20), np.float32(1))], np.float32)
  np.testing.assert_array_equal(fp8.ceil_power_of_two(s), [1.0, 2.0, 1.0, 2.0 ** -20, 2.0 ** -19])
  np.testing.assert_array_equal(fp8.decode_scales(fp8.encode_ue8m0(np.float32([0.5, 2.0 ** -10]))),
                                [0.5, 2.0 ** -10])


@pytest.mark.parametrize("case", FP8_CASES, ids=case_id)
def test_golden_fp8_checkpoint_converts_to_dequantised_logits(fp8_src, tmp_path, case):
  dst = tmp_path / "dst"
  summary = convert_mod.convert(fp8_src, str(dst))
  # FP8 weights are stored as bfloat16 (exact for power-of-two scales), the float32 rest as float32.
  assert summary["dtype"] == ["bfloat16", "float32"]
  assert_matches_case(load_model(str(dst)).model, case, "fp8dq_logits", "fp8dq_gen_ids")


@pytest.mark.parametrize("case", FP8_CASES, ids=case_id)
def test_golden_fp8_weights_kept_in_memory(fp8_src, case):
  fp8_model = load_model(fp8_src, fp8_weights=True).model
  q = fp8_model.decoder.layers[1].mlp.experts.down_proj[...]
  assert q.dtype == ml_dtypes.float8_e4m3fn
  assert fp8_model.decoder.layers[0].self_attn.o_proj.kernel_scale[...].shape == (1, 1)
  assert_matches_case(fp8_model, case, "fp8dq_logits", "fp8dq_gen_ids")
  float_bytes = state_bytes(load_model(fp8_src).model)
  # 3 bytes saved per quantised weight, minus 4 bytes per 128x128 block scale.
  cfg = load_config(fp8_src)
  quantised = [e for e in keymap.manifest(cfg) if convert_mod.FP8_EXPORT_NAME.match(e.sources[0])]
  n = sum(int(np.prod(e.dst_shape)) for e in quantised)
  blocks = sum(len(e.sources) * int(np.prod(fp8.scale_shape(e.src_shape))) for e in quantised)
  assert float_bytes - state_bytes(fp8_model) == 3 * n - 4 * blocks


def test_packed_uint8_scales_equal_float_scales(tmp_path):
  tensors = golden_tensors("model_fp8.safetensors")
  packed = {k: fp8.encode_ue8m0(v) if k.endswith(hf.SCALE_SUFFIX) else v for k, v in tensors.items()}
  cfg = load_config(GOLDEN_DIR)
  a = hf.load_params(fp8_dir(tmp_path / "float"), cfg, parts=("decoder",))
  b = hf.load_params(fp8_dir(tmp_path / "packed", packed), cfg, parts=("decoder",))
  for k, v in orbax_io.flatten(a).items():
    np.testing.assert_array_equal(orbax_io.flatten(b)[k], v)


def test_non_power_of_two_ue8m0_scale(tmp_path, capsys):
  tensors = golden_tensors("model_fp8.safetensors")
  name = "model.layers.1.self_attn.k_proj.weight_scale_inv"
  tensors[name] = tensors[name] * np.float32(1.5)
  src = fp8_dir(tmp_path / "src", tensors)
  dst = tmp_path / "dst"
  code, err = run_cli(capsys, src, dst)
  assert code == 1 and name in err and "power of two" in err and "--no-strict-scales" in err
  assert_nothing_left(dst)
  code, _ = run_cli(capsys, src, dst, "--no-strict-scales", "--dtype", "float32")
  assert code == 0
  w = restore_orbax_tree(str(dst), load_config(src))["decoder"]["layers"][1]["self_attn"]["k_proj"]["kernel"]
  base = name.removesuffix(hf.SCALE_SUFFIX)
  np.testing.assert_array_equal(np.asarray(w), fp8.dequantize(tensors[base], tensors[name]).T)


def test_unsupported_quantization_config_names_the_field(tmp_path, capsys):
  src = fp8_dir(tmp_path / "src")
  cfg = json.load(open(os.path.join(src, "config.json")))
  cfg["quantization_config"]["fmt"] = "e5m2"
  json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
  code, err = run_cli(capsys, src, tmp_path / "dst")
  assert code == 1 and "quantization_config.fmt" in err


def test_fp8_export_matches_the_golden_fp8_checkpoint_and_converts_back(tmp_path):
  export = tmp_path / "export"
  summary = convert_mod.convert(GOLDEN_DIR, str(export), fp8_export=True)
  cfg = load_config(GOLDEN_DIR)
  n_layers, n_experts = cfg.decoder.num_hidden_layers, cfg.decoder.n_routed_experts
  assert summary["fp8_tensors"] == 4 * n_layers + 3 + (n_layers - 1) * 3 * (n_experts + 1)
  qcfg = json.load(open(export / "config.json"))["quantization_config"]
  assert qcfg == convert_mod.QUANT_CONFIG
  index = json.load(open(export / "model.safetensors.index.json"))["weight_map"]
  assert set(index.values()) == {convert_mod.EXPORT_SHARD}
  # The golden FP8 checkpoint was made by the same rule from the same weights: byte-identical tensors.
  ours = safetensors_io.SafetensorsFile(str(export / convert_mod.EXPORT_SHARD))
  ref = golden_tensors("model_fp8.safetensors")
  assert set(ours.keys()) == set(ref) == set(index)
  for name, want in ref.items():
    got = ours.read(name)
    assert got.dtype == want.dtype, name
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8), err_msg=name)
    if name.endswith(hf.SCALE_SUFFIX):
      assert (np.frexp(got)[0] == 0.5).all(), name  # powers of two
  # Converting the export back: dequantised weights == dequantise(quantise(original)).
  back = tmp_path / "back"
  convert_mod.convert(str(export), str(back), dtype="float32")
  tree = restore_orbax_tree(str(back), cfg)
  orig = golden_tensors()
  for e in keymap.manifest(cfg, ("decoder",)):
    if not convert_mod.FP8_EXPORT_NAME.match(e.sources[0]):
      continue
    got = tree
    for k in e.dst:
      got = got[k]
    want = e.apply([fp8.dequantize(*fp8.quantize(orig[s])) for s in e.sources])
    np.testing.assert_array_equal(np.asarray(got), want)
