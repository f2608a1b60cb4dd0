"""The converter: released layout -> Orbax -> load_model reproduces the golden logits; bad sources fail cleanly.

Tolerances: logits within 1e-4 * max(1, max|ref|) (the golden README's float32 suggestion; conversion itself
is bit-exact, so what is left is the model's float32 arithmetic), greedy ids exact.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import GOLDEN_DIR, REPO, case_id, golden_cases
from dsocr_jax.checkpoint import convert as convert_mod
from dsocr_jax.checkpoint import keymap, orbax_io, safetensors_io
from dsocr_jax.checkpoint.load import load_model, restore_orbax_tree
from dsocr_jax.config import load_config
from dsocr_jax.trace import decoder_arrays

GEN = 32


def golden_tensors(name: str = "model.safetensors") -> dict[str, np.ndarray]:
  f = safetensors_io.SafetensorsFile(os.path.join(GOLDEN_DIR, name))
  try:
    return {k: f.read(k) for k in f.keys()}
  finally:
    f.close()


def released_dir(path, tensors, config: str = "config.json"):
  """A released-layout directory in `path` holding `tensors` (single file), the golden config and tokenizer."""
  os.makedirs(path, exist_ok=True)
  shutil.copy(os.path.join(GOLDEN_DIR, config), os.path.join(path, "config.json"))
  shutil.copy(os.path.join(GOLDEN_DIR, "tokenizer.json"), os.path.join(path, "tokenizer.json"))
  safetensors_io.save(tensors, os.path.join(path, "model.safetensors"))
  return str(path)


def assert_matches_case(model, case: str, logits_key: str = "logits", gen_key: str = "gen_ids"):
  c = np.load(case)
  out = decoder_arrays(model, c["input_ids"], c["images_seq_mask"], c["image_features"], gen=GEN)
  ref = c[logits_key]
  np.testing.assert_allclose(out["logits"], ref, rtol=0, atol=1e-4 * max(1.0, float(np.abs(ref).max())))
  np.testing.assert_array_equal(out["gen_ids"], c[gen_key][:GEN])


def run_cli(capsys, *argv) -> tuple[int, str]:
  code = convert_mod.main([str(a) for a in argv])
  return code, capsys.readouterr().err


def assert_nothing_left(dst):
  """No DST and no hidden temporary directory beside it."""
  parent = os.path.dirname(str(dst))
  assert not os.path.exists(dst)
  leftovers = [n for n in os.listdir(parent) if n.startswith(f".{os.path.basename(str(dst))}.")]
  assert leftovers == []


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
  dst = str(tmp_path_factory.mktemp("conv") / "orbax")
  summary = convert_mod.convert(GOLDEN_DIR, dst, dtype="float32")
  assert summary["tensors"] == len(keymap.manifest(load_config(GOLDEN_DIR)))
  return dst


@pytest.mark.parametrize("case", golden_cases(), ids=case_id)
def test_golden_converted_checkpoint_reproduces_logits_and_greedy_ids(converted, case):
  loaded = load_model(converted)
  assert loaded.tokenizer_path == os.path.join(converted, "tokenizer.json")
  assert_matches_case(loaded.model, case)


def test_golden_converted_layout_and_marker(converted):
  marker = orbax_io.read_marker(converted)
  assert marker["dtype"] == "float32" and marker["tensors"] == 161
  assert load_config(converted) == load_config(GOLDEN_DIR)
  # Every parameter equals the released tensor after the manifest's transform.
  tree = restore_orbax_tree(converted, load_config(converted))
  src = golden_tensors()
  for e in keymap.manifest(load_config(GOLDEN_DIR)):
    got = tree
    for k in e.dst:
      got = got[k]
    np.testing.assert_array_equal(np.asarray(got), e.apply([src[s] for s in e.sources]))


def test_golden_trace_cli_runs_on_converted_checkpoint(converted, tmp_path):
  case = os.path.join(GOLDEN_DIR, "cases", "small640_small.npz")
  c = np.load(case)
  out = tmp_path / "trace.npz"
  cmd = [sys.executable, "-m", "dsocr_jax.trace", "--checkpoint", converted, "--image",
         os.path.join(GOLDEN_DIR, str(c["image_file"])), "--prompt", str(c["prompt"]), "--mode", str(c["mode"]),
         "--gen", "4", "--out", str(out)]
  env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest")
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr
  got = np.load(out)
  np.testing.assert_array_equal(got["input_ids"], c["input_ids"])
  np.testing.assert_array_equal(got["gen_ids"], c["gen_ids"][:4])
  # Logits go through our own preprocessing here (Pillow resize), so the bound is the README's generous one.
  np.testing.assert_allclose(got["logits"], c["logits"], rtol=0, atol=1e-3 * max(1.0, float(np.abs(c["logits"]).max())))


def test_sharded_source_with_index_and_single_file_source(converted, tmp_path):
  tensors = golden_tensors()
  names = sorted(tensors)
  shards = {"model-00001-of-00003.safetensors": names[0::3], "model-00002-of-00003.safetensors": names[1::3],
            "model-00003-of-00003.safetensors": names[2::3]}
  src = tmp_path / "sharded"
  src.mkdir()
  for shard, keys in shards.items():
    safetensors_io.save({k: tensors[k] for k in keys}, str(src / shard))
  weight_map = {k: shard for shard, keys in shards.items() for k in keys}
  (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  shutil.copy(os.path.join(GOLDEN_DIR, "config.json"), src / "config.json")
  cfg = load_config(GOLDEN_DIR)
  ref = orbax_io.flatten(restore_orbax_tree(converted, cfg))
  for source in (str(src), os.path.join(GOLDEN_DIR, "model.safetensors")):
    dst = tmp_path / ("from_" + os.path.basename(source))
    convert_mod.convert(source, str(dst))  # default dtype: the source's (float32 here)
    got = orbax_io.flatten(restore_orbax_tree(str(dst), cfg))
    assert got.keys() == ref.keys()
    for k in ref:
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(ref[k]))


def test_bfloat16_output(tmp_path):
  import ml_dtypes
  dst = tmp_path / "bf16"
  summary = convert_mod.convert(GOLDEN_DIR, str(dst), dtype="bfloat16")
  assert summary["dtype"] == ["bfloat16"]
  stored = orbax_io.stored_shapes(str(dst))
  assert {d for _, d in stored.values()} == {np.dtype(ml_dtypes.bfloat16)}
  lm = restore_orbax_tree(str(dst), load_config(GOLDEN_DIR))["decoder"]["lm_head"]["kernel"]
  want = golden_tensors()["lm_head.weight"].T.astype(ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(lm), want)


def _truncate(src):
  path = os.path.join(src, "model.safetensors")
  data = open(path, "rb").read()
  open(path, "wb").write(data[:len(data) - 1000])


def _split_and_drop_shard(src):
  tensors = golden_tensors()
  os.remove(os.path.join(src, "model.safetensors"))
  names = sorted(tensors)
  halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
  for shard, keys in halves.items():
    safetensors_io.save({k: tensors[k] for k in keys}, os.path.join(src, shard))
  with open(os.path.join(src, "model.safetensors.index.json"), "w") as f:
    json.dump({"weight_map": {k: s for s, keys in halves.items() for k in keys}}, f)
  os.remove(os.path.join(src, "model-00002-of-00002.safetensors"))


def _retype(tensors):
  tensors["model.layers.2.self_attn.v_proj.weight"] = tensors["model.layers.2.self_attn.v_proj.weight"].astype(np.int32)


def _drop(tensors):
  del tensors["model.layers.1.mlp.experts.6.up_proj.weight"]


BAD_SOURCES = {
    # name: (mutate tensors before writing, mutate the written directory, text the error must contain)
    "truncated": (None, _truncate, "truncated"),
    "missing_shard": (None, _split_and_drop_shard, "model-00002-of-00002.safetensors"),
    "wrong_dtype": (_retype, None, "wrong dtype: model.layers.2.self_attn.v_proj.weight in model.safetensors: int32"),
    "missing_tensor": (_drop, None, "missing: model.layers.1.mlp.experts.6.up_proj.weight"),
}


@pytest.mark.parametrize("kind", sorted(BAD_SOURCES))
def test_bad_source_fails_cleanly(tmp_path, capsys, kind):
  before, after, expect = BAD_SOURCES[kind]
  tensors = golden_tensors()
  if before:
    before(tensors)
  src = released_dir(tmp_path / "src", tensors)
  if after:
    after(src)
  dst = tmp_path / "out" / "dst"
  code, err = run_cli(capsys, src, dst)
  assert code == 1
  assert expect in err
  assert err.startswith("convert: error: ")
  assert not dst.exists()


def test_every_problem_is_listed_in_one_error(tmp_path, capsys):
  tensors = golden_tensors()
  _drop(tensors)
  _retype(tensors)
  tensors["model.layers.0.mlp.extra.weight"] = np.zeros((4,), np.float32)
  src = released_dir(tmp_path / "src", tensors)
  code, err = run_cli(capsys, src, tmp_path / "dst")
  assert code == 1 and "3 problem(s)" in err
  assert "missing: model.layers.1.mlp.experts.6.up_proj.weight" in err
  assert "wrong dtype: model.layers.2.self_attn.v_proj.weight" in err
  assert "unexpected: model.layers.0.mlp.extra.weight" in err


def test_existing_destination_needs_overwrite(tmp_path, capsys):
  dst = tmp_path / "dst"
  dst.mkdir()
  (dst / "keep.txt").write_text("old")
  code, err = run_cli(capsys, GOLDEN_DIR, dst)
  assert code == 1 and "--overwrite" in err
  assert (dst / "keep.txt").read_text() == "old"
  code, _ = run_cli(capsys, GOLDEN_DIR, dst, "--overwrite", "--dtype", "float32")
  assert code == 0
  assert not (dst / "keep.txt").exists() and orbax_io.is_converted(str(dst))
  assert os.listdir(tmp_path) == ["dst"]  # no .dst.old-* / .dst.tmp-* left beside it


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch, exc):
  real_add = orbax_io.ParamsWriter.add
  calls = []

  def failing_add(self, path, value):
    calls.append(path)
    if len(calls) == 100:  # well into the decoder, after several pieces were saved
      raise exc("stop")
    real_add(self, path, value)

  monkeypatch.setattr(orbax_io.ParamsWriter, "add", failing_add)
  monkeypatch.setattr(orbax_io, "FLUSH_BYTES", 64 * 1024)
  dst = tmp_path / "dst"
  with pytest.raises(exc):
    convert_mod.convert(GOLDEN_DIR, str(dst))
  assert_nothing_left(dst)
  assert os.listdir(tmp_path) == []


def test_cli_module_exit_codes(tmp_path):
  cmd = [sys.executable, "-m", "dsocr_jax.convert", str(tmp_path / "nope"), str(tmp_path / "dst")]
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1
  assert r.stderr.strip() == f"convert: error: source: {tmp_path / 'nope'} does not exist"
  r = subprocess.run(cmd[:3] + ["--dtype", "int8"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


SHARDED_RESTORE = r"""
import sys, numpy as np, jax
jax.config.update("jax_default_matmul_precision", "highest")
from dsocr_jax import sharding
from dsocr_jax.checkpoint import convert
from dsocr_jax.checkpoint.load import load_model
golden, dst, case = sys.argv[1:4]
assert len(jax.devices()) == 4
convert.convert(golden, dst, dtype="float32", mesh="expert=4")
loaded = load_model(dst, mesh=sharding.parse_mesh("expert=4"))
experts = loaded.model.decoder.layers[1].mlp.experts.gate_proj[...]
per_device = sharding.per_device_bytes(experts)
assert len(per_device) == 4 and all(b == experts.nbytes // 4 for b in per_device.values()), per_device
c = np.load(case)
from dsocr_jax.trace import decoder_arrays
out = decoder_arrays(loaded.model, c["input_ids"], c["images_seq_mask"], c["image_features"], gen=4)
np.testing.assert_allclose(out["logits"], c["logits"], rtol=0, atol=1e-4 * max(1.0, float(np.abs(c["logits"]).max())))
np.testing.assert_array_equal(out["gen_ids"], c["gen_ids"][:4])
print("ok")
"""


def test_golden_sharded_restore_places_expert_shards(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  case = os.path.join(GOLDEN_DIR, "cases", "small640_small.npz")
  r = subprocess.run([sys.executable, "-c", SHARDED_RESTORE, GOLDEN_DIR, str(tmp_path / "dst"), case], cwd=REPO,
                     env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_pytorch_state_dict_source(tmp_path):
  torch = pytest.importorskip("torch")  # optional dependency: only .bin/.pt sources need it
  tensors = golden_tensors()
  src = tmp_path / "pt"
  src.mkdir()
  shutil.copy(os.path.join(GOLDEN_DIR, "config.json"), src / "config.json")
  sd = {k: torch.from_numpy(v.copy()) for k, v in tensors.items()}
  sd["lm_head.weight"] = sd["lm_head.weight"].to(torch.bfloat16)
  torch.save(sd, src / "pytorch_model.bin")
  dst = tmp_path / "dst"
  convert_mod.convert(str(src / "pytorch_model.bin"), str(dst), dtype="float32")
  tree = restore_orbax_tree(str(dst), load_config(GOLDEN_DIR))
  want = sd["lm_head.weight"].float().numpy().T
  np.testing.assert_array_equal(np.asarray(tree["decoder"]["lm_head"]["kernel"]), want)
