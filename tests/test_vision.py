"""DeepEncoder and full multimodal forward against the official model, on every golden case.

The model is fed the golden `pixel_values` / `images_crop` (so Pillow versions do not matter) and run through
`dsocr_jax.trace.trace_arrays`, the path the trace CLI uses. Tolerances: resized position tables max abs
error <= 1e-5; every other float array max abs error <= 1e-4 * max(1, max|ref|); greedy ids exact.
Plus hand-worked checks of the resize matrices and the 2-D layout.
"""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import GOLDEN_DIR, case_id, golden_cases
from dsocr_jax.checkpoint.load import load_model
from dsocr_jax.model import projector, resize
from dsocr_jax.trace import trace_arrays

CASES = golden_cases()
IDS = [case_id(c) for c in CASES]


def _tol(ref):
  return 1e-4 * max(1.0, float(np.abs(ref).max()))


@functools.cache
def golden_model():
  return load_model(GOLDEN_DIR).model


@functools.cache
def traced(path):
  case = np.load(path)
  tiles = case["images_crop"].transpose(0, 2, 3, 1)
  views = [(case["pixel_values"][0].transpose(1, 2, 0), tiles, tuple(int(v) for v in case["images_spatial_crop"][0]))]
  gen = int(case["gen_ids"].shape[0])
  return case, trace_arrays(golden_model(), case["input_ids"], case["images_seq_mask"], views, gen=gen)


def test_golden_cases_present():
  assert len(CASES) >= 1, f"no golden cases under {GOLDEN_DIR}/cases"


@pytest.mark.parametrize("path", CASES, ids=IDS)
def test_golden_position_tables(path):
  case = np.load(path)
  model = golden_model()
  checked = 0
  for view in ("global", "crops"):
    if f"sam_pos_embed_{view}" in case.files:
      ref = case[f"sam_pos_embed_{view}"][0]
      got = np.asarray(model.sam_model.pos_embed_for(ref.shape[0]))
      assert got.shape == ref.shape
      assert np.abs(got - ref).max() <= 1e-5, f"sam_pos_embed_{view}"
      checked += 1
    if f"clip_pos_embed_{view}" in case.files:
      ref = case[f"clip_pos_embed_{view}"][0]
      got = np.asarray(model.vision_model.position_table(int(round((ref.shape[0] - 1) ** 0.5))))
      assert got.shape == ref.shape
      assert np.abs(got - ref).max() <= 1e-5, f"clip_pos_embed_{view}"
      checked += 1
  assert checked >= 1


VISION_KEYS = ["sam_global", "clip_global", "proj_global", "sam_crops", "clip_crops", "proj_crops"]


@pytest.mark.parametrize("path", CASES, ids=IDS)
def test_golden_encoder_outputs(path):
  case, got = traced(path)
  present = [k for k in VISION_KEYS if k in case.files]
  assert {"sam_global", "clip_global", "proj_global"} <= set(present)
  assert set(present) == {k for k in VISION_KEYS if k in got}, "tile outputs present in one and not the other"
  for key in present:
    ref = case[key]
    assert got[key].shape == ref.shape, key
    err = np.abs(got[key] - ref).max()
    assert err <= _tol(ref), f"{key}: max abs error {err}"


@pytest.mark.parametrize("key", ["image_features", "inputs_embeds", "logits"])
@pytest.mark.parametrize("path", CASES, ids=IDS)
def test_golden_features_embeds_logits(path, key):
  case, got = traced(path)
  ref = case[key]
  assert got[key].shape == ref.shape
  err = np.abs(got[key] - ref).max()
  assert err <= _tol(ref), f"{key}: max abs error {err}"


@pytest.mark.parametrize("path", CASES, ids=IDS)
def test_golden_greedy_ids(path):
  case, got = traced(path)
  np.testing.assert_array_equal(got["gen_ids"], case["gen_ids"])


# ----------------------------------------------------------------------------------------- hand-worked


def test_linear_resize_matrix_hand_worked():
  # 4 -> 2: source coordinates (i + 0.5) * 2 - 0.5 = 0.5 and 2.5: halfway between neighbours.
  np.testing.assert_allclose(resize.linear_matrix(4, 2), [[.5, .5, 0, 0], [0, 0, .5, .5]])
  # 2 -> 4: coordinates -0.25 (clamped to 0), 0.25, 0.75, 1.25 (upper tap clamped to the last index).
  np.testing.assert_allclose(resize.linear_matrix(2, 4), [[1, 0], [.75, .25], [.25, .75], [0, 1]])


def test_bicubic_aa_matrix_hand_worked():
  # Same size: the Keys kernel is 1 at 0 and 0 at +-1, +-2, so the map is the identity.
  np.testing.assert_allclose(resize.bicubic_aa_matrix(5, 5), np.eye(5), atol=1e-15)
  # 2 -> 1: center 1, support 4 (scale 2), taps 0 and 1 at distance 0.5 / 2 = 0.25 each: equal weights.
  np.testing.assert_allclose(resize.bicubic_aa_matrix(2, 1), [[.5, .5]])
  # 1 -> 2 (up-sampling, support 2): one tap, normalised to weight 1 (edges renormalise instead of clamping).
  np.testing.assert_allclose(resize.bicubic_aa_matrix(1, 2), [[1.], [1.]])
  # 4 -> 2, row 0: center 1, support 4, taps 0..3 (trunc(-2.5) -> 0 .. min(trunc(5.5), 4)) at distances
  # (j + 0.5 - 1) / 2 = -0.25, 0.25, 0.75, 1.25; Keys a = -0.5 values, normalised to sum 1.
  k = lambda x: (1.5 * x - 2.5) * x * x + 1 if x < 1 else ((-0.5 * x + 2.5) * x - 4) * x + 2
  w = np.array([k(0.25), k(0.25), k(0.75), k(1.25)])
  np.testing.assert_allclose(resize.bicubic_aa_matrix(4, 2)[0], w / w.sum(), rtol=1e-12)


def test_layout_hand_worked():
  d = 1
  newline, sep = jnp.full((d,), -1.0), jnp.full((d,), -2.0)
  glob = jnp.arange(4.0).reshape(4, d)  # a 2x2 global grid: rows [0, 1], [2, 3]
  # Two tiles side by side (w=2, h=1) of 2x2 tokens each: tile 0 = 10..13, tile 1 = 20..23.
  tiles = jnp.asarray([[10., 11, 12, 13], [20, 21, 22, 23]])[..., None]
  seq = projector.image_sequence(glob, tiles, (2, 1), newline, sep)[:, 0]
  expected = [10, 11, 20, 21, -1, 12, 13, 22, 23, -1,  # mosaic rows with newlines
              0, 1, -1, 2, 3, -1,  # global rows with newlines
              -2]  # separator
  np.testing.assert_array_equal(np.asarray(seq), expected)
  # Stacked tiles (w=1, h=2): tile 1 goes below tile 0.
  seq = projector.image_sequence(glob, tiles, (1, 2), newline, sep)[:, 0]
  np.testing.assert_array_equal(np.asarray(seq[:12]), [10, 11, -1, 12, 13, -1, 20, 21, -1, 22, 23, -1])
  # No tiles: global + separator only.
  seq = projector.image_sequence(glob, None, (1, 1), newline, sep)[:, 0]
  np.testing.assert_array_equal(np.asarray(seq), [0, 1, -1, 2, 3, -1, -2])
