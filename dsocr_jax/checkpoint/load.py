"""One entry point to get a ready model from a checkpoint directory: `load_model(path)`.

Formats, detected from the directory contents so that callers (trace, serve, train) never care:
* our Orbax layout (`python -m dsocr_jax.convert`; marker `dsocr_jax.json`): restored straight into the target
  dtype, and, given a mesh or shardings, each parameter shard straight onto its devices;
* the released layout (config.json + safetensors [+ index] + tokenizer.json), FP8 variants included, or a single
  `.safetensors` file with config.json beside it.

`fp8_weights=True` (FP8 released-layout sources) keeps the decoder's FP8 linear weights as e4m3 in memory with
their block scales as `FP8Scale` variables (`Dense.kernel_scale`, `RoutedExperts.*_scale`), dequantised at
matmul time; the float result equals that of the dequantised weights (the dequantisation is exact either way).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsocr_jax.config import ModelConfig, load_config


@dataclasses.dataclass
class LoadedModel:
  model: "object"  # dsocr_jax.model.ocr.DeepseekOCR
  config: ModelConfig
  tokenizer_path: str | None
  source: str
  fp8_weights: bool = False


def model_ctor(cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=None) -> Callable[[], nnx.Module]:
  from dsocr_jax.model.ocr import DeepseekOCR
  return lambda: DeepseekOCR(cfg, dtype=dtype, param_dtype=param_dtype or dtype, rngs=nnx.Rngs(0))


def build_model(cfg: ModelConfig, tree: dict, *, dtype=jnp.float32, param_dtype=None):
  from dsocr_jax.model import params
  return params.from_tree(model_ctor(cfg, dtype=dtype, param_dtype=param_dtype), tree,
                          dtype=param_dtype or dtype)


def attach_fp8_scales(module: nnx.Module, scales: Mapping[tuple, np.ndarray], prefix: tuple = ()) -> nnx.Module:
  """Sets the FP8 block scales of `module`'s e4m3 kernels. `scales` is keyed by the kernel's parameter path
  (`hf.load_params_fp8`); `prefix` is dropped from each path (e.g. `("decoder",)` for a bare `Decoder`)."""
  from dsocr_jax.model.layers import FP8Scale
  for path, scale in scales.items():
    if path[:len(prefix)] != prefix:
      continue
    rel = path[len(prefix):]
    owner = module
    for k in rel[:-1]:
      owner = owner[k] if isinstance(k, int) else getattr(owner, k)
    # A Dense holds `kernel` + `kernel_scale`; RoutedExperts holds `gate_proj` + `gate_proj_scale`, etc.
    slot = rel[-1] + "_scale"
    if not hasattr(owner, slot):
      raise ValueError(f"fp8: {'.'.join(map(str, path))} has no scale slot {slot!r} in the model")
    # The slot starts as None, which NNX records as static; nnx.data makes the scale a pytree leaf.
    setattr(owner, slot, nnx.data(FP8Scale(jnp.asarray(scale, jnp.float32))))
  return module


def state_bytes(module: nnx.Module) -> int:
  """Bytes of every variable of `module` (parameters, FP8 scales)."""
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                 for x in jax.tree.leaves(nnx.state(module))))


def _shardings_for(cfg: ModelConfig, mesh, dtype, param_dtype) -> dict:
  from dsocr_jax import sharding
  abstract = nnx.eval_shape(model_ctor(cfg, dtype=dtype, param_dtype=param_dtype))
  return nnx.to_pure_dict(sharding.param_shardings(nnx.state(abstract), mesh))


def restore_orbax_tree(path: str, cfg: ModelConfig, *, param_dtype=jnp.float32,
                       shardings: Mapping | None = None) -> dict:
  """Our Orbax checkpoint's parameter tree, cast to `param_dtype`; with `shardings` (a tree like the params,
  of `jax.sharding.Sharding`) each device reads only its own slices."""
  from dsocr_jax.checkpoint import orbax_io
  orbax_io.read_marker(path)
  abstract = nnx.eval_shape(model_ctor(cfg, dtype=param_dtype))
  target = orbax_io.abstract_target(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)), param_dtype, shardings)
  return orbax_io.restore(path, target)


def load_model(path: str, *, dtype=jnp.float32, param_dtype=None, fp8_weights: bool = False, mesh=None,
               shardings: Mapping | None = None) -> LoadedModel:
  """Loads a checkpoint directory (either format). `dtype` is the compute dtype, `param_dtype` the storage
  dtype of floating parameters (default `dtype`; FP8 storage is kept with `fp8_weights`). `mesh` (a
  `jax.sharding.Mesh`, placed by `dsocr_jax.sharding`'s logical-axis rules) or explicit `shardings` place the
  parameters; without either they land on the default device."""
  from dsocr_jax.checkpoint import hf, orbax_io
  if not os.path.exists(path):
    raise ValueError(f"checkpoint: {path} does not exist")
  param_dtype = param_dtype or dtype
  cfg_dir = hf.config_dir(path)
  cfg = load_config(cfg_dir)
  if orbax_io.is_converted(path):
    if fp8_weights:
      raise ValueError(f"fp8_weights: {path} is a converted (dequantised) checkpoint; FP8 weights are served "
                       "from an FP8 released-layout checkpoint (e.g. `convert --fp8-export`)")
    if shardings is None and mesh is not None:
      shardings = _shardings_for(cfg, mesh, dtype, param_dtype)
    model = build_model(cfg, restore_orbax_tree(path, cfg, param_dtype=param_dtype, shardings=shardings),
                        dtype=dtype, param_dtype=param_dtype)
  else:
    if fp8_weights:
      tree, scales = hf.load_params_fp8(path, cfg)
      if not scales:
        raise ValueError(f"fp8_weights: {path} holds no FP8 weights (no *_scale_inv tensors)")
      model = attach_fp8_scales(build_model(cfg, tree, dtype=dtype, param_dtype=param_dtype), scales)
    else:
      model = build_model(cfg, hf.load_params(path, cfg), dtype=dtype, param_dtype=param_dtype)
    if shardings is not None:
      state = nnx.state(model)
      nnx.replace_by_pure_dict(state, jax.tree.map(jax.device_put, nnx.to_pure_dict(state), dict(shardings)))
      nnx.update(model, state)
    elif mesh is not None:
      from dsocr_jax import sharding
      sharding.shard_module(model, mesh)
  tok = os.path.join(cfg_dir, "tokenizer.json")
  return LoadedModel(model, cfg, tok if os.path.exists(tok) else None, path, fp8_weights)
