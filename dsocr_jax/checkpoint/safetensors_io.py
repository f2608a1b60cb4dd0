"""Memory-mapped safetensors reading and atomic writing with numpy + ml_dtypes (no torch).

Why not `safetensors.numpy`: its numpy backend cannot return float8 tensors (it looks up
`numpy.float8_e4m3fn`, which numpy does not have), and FP8 checkpoints are part of our input formats. The
format is simple (8-byte little-endian header length, a JSON header, raw little-endian bytes), so we read it
ourselves: `get` gives a lazy `np.memmap` view, `read` an owned copy of one tensor (`pread`). The converter uses
`read`: pages a memmap has touched count in the process's RSS until it is unmapped, so streaming a 6.7 GB file
through one memmap would look (and, under memory pressure, act) like holding the whole model. `StreamWriter`
writes a file whose header is known up front one tensor at a time, so exports never hold the model either.
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
    self._fd: int | None = None

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

  def nbytes(self, name: str) -> int:
    _, _, start, end = self._entries[name]
    return end - start

  def read(self, name: str) -> np.ndarray:
    """The tensor as an owned array (one positioned read; nothing stays mapped)."""
    dtype, shape, start, end = self._entries[name]
    if self._fd is None:
      self._fd = os.open(self.path, os.O_RDONLY)
    out = np.empty(end - start, np.uint8)
    view, done = memoryview(out), 0
    while done < len(out):
      n = os.preadv(self._fd, [view[done:]], self._base + start + done)
      if n <= 0:
        raise ValueError(f"{self.path}: truncated while reading tensor {name!r}")
      done += n
    return out.view(dtype).reshape(shape)

  def close(self):
    self._mmap = None
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


TensorSpec = tuple[str, np.dtype, tuple[int, ...]]


class StreamWriter:
  """Writes a safetensors file tensor by tensor, in the order of `specs`; atomic (temp file, rename on close).

  Use as a context manager: an exception inside the block (or a missing tensor) removes the temporary file.
  """

  def __init__(self, path: str, specs: list[TensorSpec], metadata: Mapping[str, str] | None = None):
    self.path = path
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in specs:
      dtype = np.dtype(dtype)
      if dtype not in _NAMES:
        raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
      nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
      header[name] = {"dtype": _NAMES[dtype], "shape": [int(d) for d in shape],
                      "data_offsets": [offset, offset + nbytes]}
      offset += nbytes
    self._pending = [(name, np.dtype(dtype), tuple(shape)) for name, dtype, shape in specs]
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    fd, self._tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-",
                                     suffix=".safetensors")
    self._file = os.fdopen(fd, "wb")
    self._file.write(struct.pack("<Q", len(blob)))
    self._file.write(blob)

  def write(self, name: str, array: np.ndarray) -> None:
    if not self._pending:
      raise ValueError(f"{self.path}: tensor {name!r} was not declared")
    want_name, dtype, shape = self._pending.pop(0)
    a = np.ascontiguousarray(array)
    if (name, a.dtype, a.shape) != (want_name, dtype, shape):
      raise ValueError(f"{self.path}: expected tensor {want_name!r} {dtype} {list(shape)} next, "
                       f"got {name!r} {a.dtype} {list(a.shape)}")
    self._file.write(memoryview(a.reshape(-1).view(np.uint8)))

  def close(self) -> None:
    if self._pending:
      raise ValueError(f"{self.path}: {len(self._pending)} declared tensor(s) were never written, first "
                       f"{self._pending[0][0]!r}")
    self._file.flush()
    os.fsync(self._file.fileno())
    self._file.close()
    os.replace(self._tmp, self.path)

  def abort(self) -> None:
    self._file.close()
    if os.path.exists(self._tmp):
      os.unlink(self._tmp)

  def __enter__(self) -> "StreamWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      try:
        self.close()
        return
      except BaseException:
        self.abort()
        raise
    self.abort()


def save(tensors: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str] | None = None) -> None:
  """Writes a safetensors file atomically (temporary file in the same directory, then rename)."""
  arrays = {name: np.asarray(a) for name, a in tensors.items()}
  with StreamWriter(path, [(n, a.dtype, a.shape) for n, a in arrays.items()], metadata) as w:
    for name, a in arrays.items():
      w.write(name, a)


def iter_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  f = SafetensorsFile(path)
  for name in f.keys():
    yield name, f.get(name)
