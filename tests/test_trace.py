"""`python -m dsocr_jax.trace` end to end (subprocess) against a golden case, and its bad-argument handling.

Tolerances: preprocessing arrays (Pillow resizes) max abs error <= 1e-5; vision outputs, image features,
embeddings and logits <= 1e-4 * max(1, max|ref|); ids, masks and greedy tokens exact.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import GOLDEN_DIR, REPO, case_id, golden_cases

# The smallest case (one 640 view, 122 tokens) keeps the subprocess fast; the in-process golden tests in
# test_vision.py cover every case through the same functions.
CLI_CASE = "small640_small"
FLOAT_KEYS = ["sam_global", "clip_global", "proj_global", "image_features", "inputs_embeds", "logits"]
EXACT_KEYS = ["input_ids", "images_seq_mask", "images_spatial_crop", "gen_ids"]


def _run(*args, devices: int = 1):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return subprocess.run([sys.executable, "-m", "dsocr_jax.trace", *args], capture_output=True, text=True,
                        cwd=REPO, env=env, timeout=600)


def _case_args(case):
  return ["--checkpoint", GOLDEN_DIR, "--image", os.path.join(GOLDEN_DIR, str(case["image_file"])),
          "--prompt", str(case["prompt"]), "--mode", str(case["mode"]), "--max-crops", str(int(case["max_crops"]))]


@pytest.fixture(scope="module", params=[None, "expert=4"], ids=["one-device", "mesh-expert4"])
def cli_trace(request, tmp_path_factory):
  paths = {case_id(p): p for p in golden_cases()}
  if CLI_CASE not in paths:
    pytest.fail(f"golden case {CLI_CASE} not found under {GOLDEN_DIR}/cases")
  case = np.load(paths[CLI_CASE])
  out = str(tmp_path_factory.mktemp("trace") / "trace.npz")
  mesh = ["--mesh", request.param] if request.param else []
  proc = _run(*_case_args(case), "--gen", str(case["gen_ids"].shape[0]), "--out", out, *mesh,
              devices=4 if request.param else 1)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return case, np.load(out)


def test_golden_trace_cli_preprocessing(cli_trace):
  case, got = cli_trace
  for key in ("pixel_values", "images_crop"):
    assert got[key].shape == case[key].shape, key
    if case[key].size:
      assert np.abs(got[key] - case[key]).max() <= 1e-5, key


def test_golden_trace_cli_exact_arrays(cli_trace):
  case, got = cli_trace
  for key in EXACT_KEYS:
    np.testing.assert_array_equal(got[key], case[key], err_msg=key)


def test_golden_trace_cli_float_arrays(cli_trace):
  case, got = cli_trace
  for key in FLOAT_KEYS:
    ref = case[key]
    assert got[key].shape == ref.shape, key
    err = np.abs(got[key] - ref).max()
    assert err <= 1e-4 * max(1.0, float(np.abs(ref).max())), f"{key}: max abs error {err}"


@pytest.mark.parametrize("bad", [
    ["--mode", "huge"],  # rejected by argparse
    ["--image", "/nonexistent/page.png"],  # rejected before any model work
    ["--max-crops", "0"],  # a library ValueError (preprocess), reported as one line
])
def test_trace_cli_bad_arguments(bad, tmp_path):
  args = {"--checkpoint": GOLDEN_DIR, "--image": os.path.join(GOLDEN_DIR, "images", "small_500x400.png"),
          "--prompt": "<image>\nFree OCR.", "--mode": "small", "--out": str(tmp_path / "t.npz")}
  args[bad[0]] = bad[1]
  proc = _run(*[x for kv in args.items() for x in kv])
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("trace: error:"), proc.stderr
  assert bad[0].lstrip("-").split("-")[0] in lines[0], lines[0]
  assert not os.path.exists(tmp_path / "t.npz")
