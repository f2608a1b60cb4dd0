"""Shared test setup: float32 parity settings and the golden data directory."""

import glob
import os

import jax
import pytest

# Parity tests compare against float32 PyTorch: no reduced-precision matmul passes anywhere.
jax.config.update("jax_default_matmul_precision", "highest")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_DIR = os.environ.get("DSOCR_GOLDEN_DIR", os.path.join(REPO, "..", "shared", "golden"))


def golden_cases() -> list[str]:
  """Every case file in the golden directory: tests are parametrised over what is there, not a fixed list."""
  return sorted(glob.glob(os.path.join(GOLDEN_DIR, "cases", "*.npz")))


def case_id(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


@pytest.fixture(scope="session")
def golden_dir() -> str:
  if not os.path.isdir(GOLDEN_DIR):
    pytest.fail(f"golden data not found at {GOLDEN_DIR} (set DSOCR_GOLDEN_DIR)")
  return GOLDEN_DIR


def pytest_collection_modifyitems(config, items):
  # Golden tests are selected by `-k golden` through their names; mark them too for `-m golden`.
  for item in items:
    if "golden" in item.nodeid:
      item.add_marker(pytest.mark.golden)
