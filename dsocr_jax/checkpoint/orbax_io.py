"""Our converted checkpoint format: an Orbax checkpoint of the parameter tree, written in pieces, restored sharded.

A converted directory holds
  params/          an Orbax (OCDBT + zarr3) checkpoint of our parameter tree (keys = `keymap.manifest` dst paths)
  config.json      `config.to_hub_dict` (the hub format, so every loader reads it the same way)
  dsocr_jax.json   the marker: format name and version, parameter dtype, source, tensor count
  tokenizer files  copied from the source

Writing goes through Orbax's partial save (`orbax.checkpoint.experimental.v1.partial`): each `save` adds a
disjoint piece of the tree to a pending checkpoint, `finalize` merges the pieces by renames. So the converter
holds about one layer at a time, never the model. Restoring takes a target tree of `jax.ShapeDtypeStruct`s; when
those carry shardings, every device reads only its own slices (arrays are chunked at `CHUNK_BYTES`, so a shard
read does not decode the whole array). The v1 API is marked experimental; everything touching it is in this file.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp

from dsocr_jax.model.params import flatten

FORMAT = "dsocr-jax-orbax"
VERSION = 1
MARKER = "dsocr_jax.json"
PARAMS_DIR = "params"
CHUNK_BYTES = 64 * 1024 * 1024
FLUSH_BYTES = 256 * 1024 * 1024

Path = tuple[Any, ...]


def _context(partial_load: bool = False) -> ocp.Context:
  ctx = ocp.Context()
  # Weights barely compress and the CPU is the bottleneck of a conversion: store raw bytes.
  ctx.array.saving.use_compression = False
  ctx.array.saving.storage_options.chunk_byte_size = CHUNK_BYTES
  ctx.pytree.loading.partial_load = partial_load
  return ctx


def is_converted(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MARKER)) and os.path.isdir(os.path.join(path, PARAMS_DIR))


def read_marker(path: str) -> dict:
  try:
    with open(os.path.join(path, MARKER)) as f:
      marker = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"checkpoint: {os.path.join(path, MARKER)} is unreadable: {e}") from None
  if marker.get("format") != FORMAT or marker.get("version") != VERSION:
    raise ValueError(f"checkpoint: {path} is format {marker.get('format')!r} version {marker.get('version')!r}; "
                     f"this build reads {FORMAT!r} version {VERSION}")
  return marker


def write_marker(path: str, **fields) -> None:
  with open(os.path.join(path, MARKER), "w") as f:
    json.dump(dict(format=FORMAT, version=VERSION, **fields), f, indent=1)


def _nest(flat: Mapping[Path, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return tree


class ParamsWriter:
  """Adds leaves to a pending Orbax checkpoint, saving a piece whenever `flush_bytes` are buffered.

  `finalize()` commits the checkpoint at `path`; until then only `<path>.partial_save*` exists (the converter
  removes its whole temporary directory on failure)."""

  def __init__(self, path: str, flush_bytes: int | None = None):
    self.path = path
    self.flush_bytes = FLUSH_BYTES if flush_bytes is None else flush_bytes
    self._buffer: dict[Path, np.ndarray] = {}
    self._buffered = 0
    self.written: dict[Path, tuple[tuple[int, ...], np.dtype]] = {}

  def add(self, path: Path, value: np.ndarray) -> None:
    if path in self.written or path in self._buffer:
      raise ValueError(f"orbax: parameter {'.'.join(map(str, path))} written twice")
    self._buffer[path] = value
    self._buffered += value.nbytes
    if self._buffered >= self.flush_bytes:
      self.flush()

  def flush(self) -> None:
    if not self._buffer:
      return
    with _context():
      ocp.partial.save(self.path, _nest(self._buffer))
    self.written.update({p: (tuple(v.shape), v.dtype) for p, v in self._buffer.items()})
    self._buffer, self._buffered = {}, 0

  def finalize(self) -> None:
    self.flush()
    with _context():
      ocp.partial.finalize(self.path)


def _key(k: str):
  return int(k) if isinstance(k, str) and k.isdigit() else k


def stored_shapes(path: str) -> dict[Path, tuple[tuple[int, ...], np.dtype]]:
  """(shape, dtype) of every stored parameter, by our tree path (layer indices as ints)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    meta = ocp.pytree_metadata(os.path.join(path, PARAMS_DIR)).metadata
  return {tuple(_key(k) for k in p): (tuple(m.shape), np.dtype(m.dtype)) for p, m in flatten(meta).items()}


def check_stored(path: str, want: Mapping[Path, tuple[tuple[int, ...], Any]], *, partial: bool = False) -> None:
  """One error listing every missing, unexpected, mis-shaped or mis-typed stored parameter."""
  have = stored_shapes(path)
  name = lambda p: ".".join(map(str, p))  # noqa: E731
  problems = [f"missing: {name(p)} {list(s)}" for p, (s, _) in want.items() if p not in have]
  if not partial:
    problems += [f"unexpected: {name(p)}" for p in have if p not in want]
  for p, (shape, dtype) in want.items():
    if p in have and have[p][0] != tuple(shape):
      problems.append(f"wrong shape: {name(p)}: expected {list(shape)}, stored {list(have[p][0])}")
    elif p in have and dtype is not None and have[p][1] != np.dtype(dtype):
      problems.append(f"wrong dtype: {name(p)}: expected {np.dtype(dtype)}, stored {have[p][1]}")
  if problems:
    raise ValueError(f"checkpoint {path} does not match the model ({len(problems)} problem(s)):\n  "
                     + "\n  ".join(problems))


def restore(path: str, target: Mapping, *, partial: bool = False) -> dict:
  """Restores the parameters named by `target` (a nested dict of `jax.ShapeDtypeStruct`, optionally with
  shardings; values are cast to their dtype). `partial=True` allows a subtree (e.g. only the decoder)."""
  check_stored(path, {p: (s.shape, None) for p, s in flatten(target).items()}, partial=partial)
  with _context(partial_load=partial), warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    return ocp.load_pytree(os.path.join(path, PARAMS_DIR), dict(target))


def abstract_target(shapes: Mapping, dtype=None, shardings: Mapping | None = None) -> dict:
  """ShapeDtypeStructs for `restore` from a tree of arrays/ShapeDtypeStructs, an optional dtype for floating
  leaves and an optional same-shaped tree of shardings (default: the first device)."""
  flat_sh = flatten(shardings) if shardings is not None else {}
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def one(p, v):
    dt = np.dtype(v.dtype)
    if dtype is not None and jax.numpy.issubdtype(dt, jax.numpy.floating) and dt.itemsize > 1:
      dt = np.dtype(dtype)
    return jax.ShapeDtypeStruct(tuple(v.shape), dt, sharding=flat_sh.get(p, default))

  return _nest({p: one(p, v) for p, v in flatten(shapes).items()})
