"""Memory-mapped safetensors reading and atomic writing with numpy + ml_dtypes (no torch).

Why not `safetensors.numpy`: its numpy backend cannot return float8 tensors (it looks up
`numpy.float8_e4m3fn`, which numpy does not have), and FP8 checkpoints are part of our input formats. The
format is simple (8-byte little-endian header length, a JSON header, raw little-endian bytes), so we read it
with `np.memmap`: tensors are materialised one at a time, only when asked for.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}

_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
  """One .safetensors file: names, dtypes and shapes from the header; tensors read lazily via a memmap."""

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      raw = f.read(8)
      if len(raw) < 8:
        raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
      (n,) = struct.unpack("<Q", raw)
      if n > min(_MAX_HEADER, size - 8):
        raise ValueError(f"{path}: not a safetensors file or truncated (header length {n}, file size {size})")
      try:
        header = json.loads(f.read(n))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt safetensors header: {e}") from None
    self.metadata = header.pop("__metadata__", None) or {}
    self._base = 8 + n
    self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    for name, e in header.items():
      if e.get("dtype") not in DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}")
      dtype, shape = DTYPES[e["dtype"]], tuple(int(s) for s in e["shape"])
      start, end = (int(x) for x in e["data_offsets"])
      if end - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise ValueError(f"{path}: tensor {name!r} byte range does not match its shape {shape} and dtype")
      if self._base + end > size:
        raise ValueError(f"{path}: truncated: tensor {name!r} ends at byte {self._base + end}, file has {size}")
      self._entries[name] = (dtype, shape, start, end)
    self._mmap = None

  def keys(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][1]

  def dtype(self, name: str) -> np.dtype:
    return self._entries[name][0]

  def get(self, name: str) -> np.ndarray:
    """The tensor as a read-only view of the file (no copy until used)."""
    dtype, shape, start, end = self._entries[name]
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    return self._mmap[self._base + start:self._base + end].view(dtype).reshape(shape)

  def close(self):
    self._mmap = None


def save(tensors: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str] | None = None) -> None:
  """Writes a safetensors file atomically (temporary file in the same directory, then rename)."""
  header: dict = {}
  if metadata:
    header["__metadata__"] = dict(metadata)
  offset = 0
  arrays = []
  for name, a in tensors.items():
    a = np.ascontiguousarray(a)
    if a.dtype not in _NAMES:
      raise ValueError(f"{name}: dtype {a.dtype} cannot be stored in safetensors")
    header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".safetensors")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(struct.pack("<Q", len(blob)))
      f.write(blob)
      for a in arrays:
        f.write(a.tobytes())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def iter_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  f = SafetensorsFile(path)
  for name in f.keys():
    yield name, f.get(name)
