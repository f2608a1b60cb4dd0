"""Reading the released checkpoint layout: `config.json`, `model.safetensors` or shards + index, tokenizer.

`CheckpointSource` gives names, shapes and tensors across shards; `validate` compares it to the manifest
(every missing, unexpected or mis-shaped tensor in one error); `load_params` builds our nested parameter tree.
FP8 tensors (a 1-byte weight with a `<name>_scale_inv` companion, spec 9) are dequantised on read.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import numpy as np

from dsocr_jax.checkpoint import fp8, keymap
from dsocr_jax.checkpoint.safetensors_io import SafetensorsFile
from dsocr_jax.config import ModelConfig, load_config

SCALE_SUFFIX = "_scale_inv"


class CheckpointSource:
  """A set of safetensors files seen as one name -> tensor mapping."""

  def __init__(self, files: Iterable[str], weight_map: dict[str, str] | None = None,
               strict_scales: bool = True, scale_fmt: str | None = None):
    self.files = {os.path.basename(p): SafetensorsFile(p) for p in files}
    self.where: dict[str, SafetensorsFile] = {}
    for f in self.files.values():
      for name in f.keys():
        self.where[name] = f
    if weight_map is not None:
      missing_files = sorted({v for v in weight_map.values() if v not in self.files})
      if missing_files:
        raise ValueError(f"checkpoint: shard(s) listed in the index are missing: {', '.join(missing_files)}")
      wrong = sorted(n for n, v in weight_map.items() if n not in self.where or
                     os.path.basename(self.where[n].path) != v)
      if wrong:
        raise ValueError(f"checkpoint: the index maps {len(wrong)} tensor(s) to a shard that does not hold them: "
                         f"{', '.join(wrong[:10])}")
    self.strict_scales = strict_scales
    self.scale_fmt = scale_fmt

  def names(self) -> list[str]:
    return list(self.where)

  def __contains__(self, name: str) -> bool:
    return name in self.where

  def shape(self, name: str) -> tuple[int, ...]:
    return self.where[name].shape(name)

  def dtype(self, name: str) -> np.dtype:
    return self.where[name].dtype(name)

  def is_fp8(self, name: str) -> bool:
    return self.dtype(name).itemsize == 1 and (name + SCALE_SUFFIX) in self.where

  def raw(self, name: str) -> np.ndarray:
    return self.where[name].get(name)

  def read(self, name: str, dtype=np.float32) -> np.ndarray:
    """The tensor as `dtype` (FP8 weights dequantised with their block scales)."""
    if self.is_fp8(name):
      scale = fp8.decode_scales(self.raw(name + SCALE_SUFFIX), name + SCALE_SUFFIX,
                                ue8m0=self.scale_fmt == "ue8m0", strict=self.strict_scales)
      return fp8.dequantize(self.raw(name), scale).astype(dtype)
    return np.asarray(self.raw(name)).astype(dtype)

  def close(self):
    for f in self.files.values():
      f.close()


def resolve_files(path: str) -> tuple[list[str], dict[str, str] | None]:
  """The safetensors files of a checkpoint directory (or a single file) and its index weight map, if any."""
  if os.path.isfile(path):
    return [path], None
  if not os.path.isdir(path):
    raise ValueError(f"checkpoint: {path} does not exist")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"checkpoint: {index} is not a valid index ({e})") from None
    shards = sorted(set(weight_map.values()))
    present = [os.path.join(path, s) for s in shards if os.path.exists(os.path.join(path, s))]
    missing = [s for s in shards if not os.path.exists(os.path.join(path, s))]
    if missing:
      raise ValueError(f"checkpoint: shard(s) listed in the index are missing: {', '.join(missing)}")
    return present, weight_map
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(single):
    return [single], None
  found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if len(found) == 1:
    return [os.path.join(path, found[0])], None
  raise ValueError(f"checkpoint: {path} holds no model.safetensors (and no model.safetensors.index.json)"
                   + (f"; found several shards without an index: {found}" if found else ""))


def quantization_config(path: str) -> dict:
  cfg_path = path if os.path.isdir(path) else os.path.dirname(path)
  try:
    with open(os.path.join(cfg_path, "config.json")) as f:
      return json.load(f).get("quantization_config") or {}
  except (OSError, json.JSONDecodeError):
    return {}


def open_checkpoint(path: str, strict_scales: bool = True) -> CheckpointSource:
  files, weight_map = resolve_files(path)
  q = quantization_config(path)
  return CheckpointSource(files, weight_map, strict_scales=strict_scales, scale_fmt=q.get("scale_fmt"))


def validate(src: CheckpointSource, entries: list[keymap.Entry], allow_unexpected: Iterable[str] = ()) -> None:
  """Raises one ValueError listing every missing, mis-shaped and unexpected tensor."""
  expected = keymap.source_shapes(entries)
  problems = []
  for name, shape in expected.items():
    if name not in src:
      problems.append(f"missing: {name} (expected shape {list(shape)})")
    elif tuple(src.shape(name)) != tuple(shape):
      problems.append(f"wrong shape: {name}: expected {list(shape)}, found {list(src.shape(name))}")
    elif src.dtype(name).itemsize == 1 and not src.is_fp8(name):
      problems.append(f"wrong dtype: {name}: 1-byte tensor {src.dtype(name)} without a {SCALE_SUFFIX} companion")
  allowed = set(keymap.OPTIONAL_UNUSED) | set(allow_unexpected)
  for name in src.names():
    if name in expected or name in allowed:
      continue
    base = name[:-len(SCALE_SUFFIX)] if name.endswith(SCALE_SUFFIX) else None
    if base is not None and base in expected:
      want = fp8.scale_shape(expected[base])
      if tuple(src.shape(name)) != want:
        problems.append(f"wrong shape: {name}: expected {list(want)}, found {list(src.shape(name))}")
      continue
    problems.append(f"unexpected: {name} (shape {list(src.shape(name))})")
  if problems:
    raise ValueError(f"checkpoint does not match the config ({len(problems)} problem(s)):\n  "
                     + "\n  ".join(problems))


def set_path(tree: dict, path: keymap.Path, value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def load_params(path: str, cfg: ModelConfig | None = None, *, dtype=np.float32,
                parts=("sam", "clip", "projector", "decoder"), strict_scales: bool = True) -> dict:
  """Reads a released-layout checkpoint into our nested parameter tree of numpy arrays."""
  cfg = cfg or load_config(path)
  entries = keymap.manifest(cfg, parts)
  src = open_checkpoint(path, strict_scales=strict_scales)
  try:
    other_parts = set(keymap.source_shapes(keymap.manifest(cfg))) - set(keymap.source_shapes(entries))
    validate(src, entries, allow_unexpected=other_parts)
    tree: dict = {}
    cache: dict[str, np.ndarray] = {}
    for e in entries:
      arrays = []
      for s in e.sources:
        if s not in cache:
          cache = {s: src.read(s, np.float32)}  # keep one source (fused qkv feeds three entries)
        arrays.append(cache[s])
      set_path(tree, e.dst, np.ascontiguousarray(e.apply(arrays)).astype(dtype))
    return tree
  finally:
    src.close()
