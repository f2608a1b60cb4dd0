"""One entry point to get a ready model from a checkpoint directory: `load_model(path)`.

Today: the released layout (config.json + safetensors [+ index] + tokenizer.json). The converter issue adds
our Orbax layout here, detected by its directory contents, so callers (trace, serve, train) never care.
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
from flax import nnx

from dsocr_jax.config import ModelConfig, load_config


@dataclasses.dataclass
class LoadedModel:
  model: "object"  # dsocr_jax.model.ocr.DeepseekOCR
  config: ModelConfig
  tokenizer_path: str | None
  source: str


def build_model(cfg: ModelConfig, tree: dict, *, dtype=jnp.float32, param_dtype=None):
  from dsocr_jax.model import params
  from dsocr_jax.model.ocr import DeepseekOCR
  return params.from_tree(lambda: DeepseekOCR(cfg, dtype=dtype, param_dtype=param_dtype or dtype,
                                              rngs=nnx.Rngs(0)), tree, dtype=param_dtype or dtype)


def load_model(path: str, *, dtype=jnp.float32, param_dtype=None) -> LoadedModel:
  """Loads a released-layout checkpoint directory. `dtype` is the compute dtype."""
  from dsocr_jax.checkpoint import hf
  if not os.path.exists(path):
    raise ValueError(f"checkpoint: {path} does not exist")
  cfg = load_config(path)
  tree = hf.load_params(path, cfg)
  tok = os.path.join(path, "tokenizer.json")
  return LoadedModel(build_model(cfg, tree, dtype=dtype, param_dtype=param_dtype), cfg,
                     tok if os.path.exists(tok) else None, path)
