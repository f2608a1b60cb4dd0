"""Reading the released checkpoint layout: `config.json`, `model.safetensors` or shards + index, tokenizer.

A `TensorSource` gives names, shapes, dtypes and tensors: `CheckpointSource` across safetensors shards,
`TorchSource` for a PyTorch state dict. `validate` compares a source to the manifest (every
missing, unexpected, mis-shaped or mis-typed tensor in one error); `entry_values` produces our parameters one
manifest entry at a time (what the loader and the streaming converter share); `load_params` builds the tree.

FP8 (spec 9): a 1-byte `float8_e4m3fn` weight with a `<name>_scale_inv` companion is dequantised on read, or,
for the FP8 serving path, kept as e4m3 with its scale grid laid out like our `[in, out]` kernel.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
from typing import Iterable, Iterator

import numpy as np

from dsocr_jax.checkpoint import fp8, keymap
from dsocr_jax.checkpoint.safetensors_io import SafetensorsFile
from dsocr_jax.config import ModelConfig, load_config

SCALE_SUFFIX = "_scale_inv"
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64), np.dtype(fp8.ml_dtypes.bfloat16))
SCALE_DTYPES = (np.dtype(np.float32), np.dtype(fp8.ml_dtypes.bfloat16), np.dtype(np.uint8))


@dataclasses.dataclass(frozen=True)
class FP8Settings:
  """The checkpoint's `quantization_config` (DeepSeek-V3 style), checked."""
  scale_fmt: str | None = None  # None or "ue8m0"
  strict_scales: bool = True


def fp8_settings(quant: dict, strict_scales: bool = True) -> FP8Settings:
  """Checks a `quantization_config`; anything but block-128 e4m3 FP8 is an error naming the field."""
  if not quant:
    return FP8Settings(strict_scales=strict_scales)
  if quant.get("quant_method") != "fp8":
    raise ValueError(f"quantization_config.quant_method: {quant.get('quant_method')!r} is not supported "
                     "(only 'fp8')")
  if quant.get("fmt", "e4m3") != "e4m3":
    raise ValueError(f"quantization_config.fmt: {quant.get('fmt')!r} is not supported (only 'e4m3')")
  if list(quant.get("weight_block_size", [fp8.BLOCK, fp8.BLOCK])) != [fp8.BLOCK, fp8.BLOCK]:
    raise ValueError(f"quantization_config.weight_block_size: {quant.get('weight_block_size')!r} is not "
                     f"supported (only [{fp8.BLOCK}, {fp8.BLOCK}])")
  if quant.get("scale_fmt") not in (None, "ue8m0"):
    raise ValueError(f"quantization_config.scale_fmt: {quant.get('scale_fmt')!r} is not supported "
                     "(null or 'ue8m0')")
  return FP8Settings(scale_fmt=quant.get("scale_fmt"), strict_scales=strict_scales)


class TensorSource(abc.ABC):
  """name -> tensor mapping; subclasses provide `names`, `shape`, `dtype`, `raw` and `location`."""

  fp8: FP8Settings = FP8Settings()

  @abc.abstractmethod
  def names(self) -> list[str]:
    ...

  @abc.abstractmethod
  def shape(self, name: str) -> tuple[int, ...]:
    ...

  @abc.abstractmethod
  def dtype(self, name: str) -> np.dtype:
    ...

  @abc.abstractmethod
  def raw(self, name: str) -> np.ndarray:
    """The stored tensor as an owned numpy array."""

  @abc.abstractmethod
  def location(self, name: str) -> str:
    """The file holding `name` (for error messages)."""

  def nbytes(self, name: str) -> int:
    return int(np.prod(self.shape(name), dtype=np.int64)) * self.dtype(name).itemsize

  def close(self) -> None:
    pass

  def __contains__(self, name: str) -> bool:
    return name in set(self.names())

  def is_fp8(self, name: str) -> bool:
    return self.dtype(name).itemsize == 1 and (name + SCALE_SUFFIX) in self

  def scale(self, name: str) -> np.ndarray:
    """The float32 block scales of FP8 weight `name` (checked as powers of two under UE8M0)."""
    return fp8.decode_scales(self.raw(name + SCALE_SUFFIX), name + SCALE_SUFFIX,
                             ue8m0=self.fp8.scale_fmt == "ue8m0", strict=self.fp8.strict_scales)

  def read(self, name: str, dtype=np.float32) -> np.ndarray:
    """The tensor as `dtype` (FP8 weights dequantised with their block scales, in float32, then cast)."""
    if self.is_fp8(name):
      return fp8.dequantize(self.raw(name), self.scale(name)).astype(dtype, copy=False)
    return self.raw(name).astype(dtype, copy=False)


class CheckpointSource(TensorSource):
  """A set of safetensors files seen as one name -> tensor mapping."""

  def __init__(self, files: Iterable[str], weight_map: dict[str, str] | None = None,
               strict_scales: bool = True, scale_fmt: str | None = None, *, settings: FP8Settings | None = None):
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
    self.fp8 = settings or FP8Settings(scale_fmt=scale_fmt, strict_scales=strict_scales)

  def names(self) -> list[str]:
    return list(self.where)

  def __contains__(self, name: str) -> bool:
    return name in self.where

  def shape(self, name: str) -> tuple[int, ...]:
    return self.where[name].shape(name)

  def dtype(self, name: str) -> np.dtype:
    return self.where[name].dtype(name)

  def raw(self, name: str) -> np.ndarray:
    return self.where[name].read(name)

  def location(self, name: str) -> str:
    return os.path.basename(self.where[name].path)

  def close(self):
    for f in self.files.values():
      f.close()


class TorchSource(TensorSource):
  """A PyTorch state dict (`.bin`/`.pt`): torch is imported only here, and loads with `weights_only=True`
  (no pickled code runs) and `mmap=True` where the file format allows it, so tensors page in on use."""

  def __init__(self, path: str, settings: FP8Settings):
    try:
      import torch
    except ImportError:
      raise ValueError(f"checkpoint: {path} is a PyTorch file; reading it needs torch (pip install torch)") from None
    self.path, self.fp8, self._torch = path, settings, torch
    try:
      try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
      except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt or hostile file
      raise ValueError(f"checkpoint: cannot read {path} as a PyTorch state dict: {e}") from None
    for wrapper in ("state_dict", "model"):
      if isinstance(sd, dict) and set(sd) == {wrapper} and isinstance(sd[wrapper], dict):
        sd = sd[wrapper]
    if not isinstance(sd, dict):
      raise ValueError(f"checkpoint: {path} holds a {type(sd).__name__}, not a state dict")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
      raise ValueError(f"checkpoint: {path}: entries that are not tensors: {', '.join(map(str, bad[:10]))}")
    self.tensors = sd

  def names(self) -> list[str]:
    return list(self.tensors)

  def __contains__(self, name: str) -> bool:
    return name in self.tensors

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.tensors[name].shape)

  def dtype(self, name: str) -> np.dtype:
    return self._numpy_dtype(self.tensors[name].dtype, name)

  def _numpy_dtype(self, torch_dtype, name: str) -> np.dtype:
    torch = self._torch
    special = {torch.bfloat16: fp8.ml_dtypes.bfloat16, torch.float8_e4m3fn: fp8.ml_dtypes.float8_e4m3fn,
               torch.float8_e5m2: fp8.ml_dtypes.float8_e5m2}
    if torch_dtype in special:
      return np.dtype(special[torch_dtype])
    try:
      return np.dtype(str(torch_dtype).removeprefix("torch."))
    except TypeError:
      raise ValueError(f"checkpoint: {self.path}: tensor {name!r} has unsupported dtype {torch_dtype}") from None

  def raw(self, name: str) -> np.ndarray:
    t = self.tensors[name].detach().contiguous()
    dt = self.dtype(name)
    if dt.kind == "V":  # bfloat16 / float8: torch's .numpy() refuses them; reinterpret the bits
      bits = {2: self._torch.int16, 1: self._torch.uint8}[dt.itemsize]
      return t.view(bits).numpy().copy().view(dt)
    return t.numpy().copy()

  def location(self, name: str) -> str:
    return os.path.basename(self.path)


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
    missing = [s for s in shards if not os.path.exists(os.path.join(path, s))]
    if missing:
      raise ValueError(f"checkpoint: shard(s) listed in the index are missing: {', '.join(missing)}")
    return [os.path.join(path, s) for s in shards], weight_map
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(single):
    return [single], None
  found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if len(found) == 1:
    return [os.path.join(path, found[0])], None
  raise ValueError(f"checkpoint: {path} holds no model.safetensors (and no model.safetensors.index.json)"
                   + (f"; found several shards without an index: {found}" if found else ""))


def config_dir(path: str) -> str:
  """The directory holding config.json and the tokenizer: `path` itself, or the folder of a weights file."""
  return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def quantization_config(path: str) -> dict:
  try:
    with open(os.path.join(config_dir(path), "config.json")) as f:
      return json.load(f).get("quantization_config") or {}
  except (OSError, json.JSONDecodeError):
    return {}


def is_torch_file(path: str) -> bool:
  return os.path.isfile(path) and path.endswith((".bin", ".pt", ".pth"))


def open_checkpoint(path: str, strict_scales: bool = True) -> TensorSource:
  """A released-layout directory, a single `.safetensors` file, or a PyTorch `.bin`/`.pt` state dict."""
  settings = fp8_settings(quantization_config(path), strict_scales)
  if is_torch_file(path):
    return TorchSource(path, settings)
  files, weight_map = resolve_files(path)
  return CheckpointSource(files, weight_map, settings=settings)


def _dtype_problem(src: TensorSource, name: str) -> str | None:
  dt = src.dtype(name)
  if src.is_fp8(name):
    if dt != fp8.E4M3:
      return f"wrong dtype: {name} in {src.location(name)}: FP8 weight stored as {dt}, expected float8_e4m3fn"
    scale_dt = src.dtype(name + SCALE_SUFFIX)
    if scale_dt not in SCALE_DTYPES:
      return f"wrong dtype: {name + SCALE_SUFFIX} in {src.location(name)}: {scale_dt} (expected float32 or uint8)"
    return None
  if dt.itemsize == 1:
    return f"wrong dtype: {name} in {src.location(name)}: 1-byte tensor {dt} without a {SCALE_SUFFIX} companion"
  if dt not in FLOAT_DTYPES:
    return f"wrong dtype: {name} in {src.location(name)}: {dt}, expected a floating-point tensor"
  return None


def validate(src: TensorSource, entries: list[keymap.Entry], allow_unexpected: Iterable[str] = ()) -> None:
  """Raises one ValueError listing every missing, mis-shaped, mis-typed and unexpected tensor."""
  expected = keymap.source_shapes(entries)
  problems = []
  for name, shape in expected.items():
    if name not in src:
      problems.append(f"missing: {name} (expected shape {list(shape)})")
    elif tuple(src.shape(name)) != tuple(shape):
      problems.append(f"wrong shape: {name}: expected {list(shape)}, found {list(src.shape(name))}")
    elif (p := _dtype_problem(src, name)) is not None:
      problems.append(p)
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


# FP8 storage is kept only for layout-only ops (a transpose, a stack of transposes): the scale grid follows the
# same op. Anything else (fused qkv splits, convs) is dequantised.
FP8_KEEPABLE_OPS = ("T", "stackT")


@dataclasses.dataclass
class EntryValue:
  entry: keymap.Entry
  value: np.ndarray  # in our layout; e4m3 when `scale` is set
  scale: np.ndarray | None = None  # float32 block scales laid out like `value` ([in/128, out/128] per kernel)


def entry_values(src: TensorSource, entries: list[keymap.Entry], dtype=np.float32, *,
                 keep_fp8: bool = False) -> Iterator[EntryValue]:
  """Our parameters, one manifest entry at a time, read tensor by tensor (one source tensor cached: a fused
  qkv feeds three entries). `dtype` may be a callable (source name, source dtype) -> dtype."""
  pick = dtype if callable(dtype) and not isinstance(dtype, type) else (lambda name, src_dtype: np.dtype(dtype))
  cache: dict[str, np.ndarray] = {}
  for e in entries:
    if keep_fp8 and e.op in FP8_KEEPABLE_OPS and all(src.is_fp8(s) for s in e.sources):
      q = e.apply([src.raw(s) for s in e.sources])
      scale = e.apply([src.scale(s) for s in e.sources])
      yield EntryValue(e, np.ascontiguousarray(q), np.ascontiguousarray(scale))
      continue
    arrays = []
    for s in e.sources:
      if s not in cache:
        cache = {s: src.read(s, pick(s, src.dtype(s)))}
      arrays.append(cache[s])
    yield EntryValue(e, np.ascontiguousarray(e.apply(arrays)))


def set_path(tree: dict, path: keymap.Path, value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _load(path: str, cfg: ModelConfig | None, dtype, parts, strict_scales: bool, keep_fp8: bool):
  cfg = cfg or load_config(config_dir(path))
  entries = keymap.manifest(cfg, parts)
  src = open_checkpoint(path, strict_scales=strict_scales)
  try:
    other_parts = set(keymap.source_shapes(keymap.manifest(cfg))) - set(keymap.source_shapes(entries))
    validate(src, entries, allow_unexpected=other_parts)
    tree: dict = {}
    scales: dict[keymap.Path, np.ndarray] = {}
    for v in entry_values(src, entries, np.float32, keep_fp8=keep_fp8):
      set_path(tree, v.entry.dst, v.value if v.scale is not None else v.value.astype(dtype, copy=False))
      if v.scale is not None:
        scales[v.entry.dst] = v.scale
    return tree, scales
  finally:
    src.close()


def load_params(path: str, cfg: ModelConfig | None = None, *, dtype=np.float32,
                parts=("sam", "clip", "projector", "decoder"), strict_scales: bool = True) -> dict:
  """Reads a released-layout checkpoint into our nested parameter tree of numpy arrays (FP8 dequantised)."""
  return _load(path, cfg, dtype, parts, strict_scales, keep_fp8=False)[0]


def load_params_fp8(path: str, cfg: ModelConfig | None = None, *, dtype=np.float32,
                    parts=("sam", "clip", "projector", "decoder"), strict_scales: bool = True
                    ) -> tuple[dict, dict[keymap.Path, np.ndarray]]:
  """Like `load_params`, but FP8 linear weights stay e4m3 (kernel layout `[in, out]`, or `[E, in, out]`).

  Returns (tree, scales): `scales[dst path of a kernel]` is its float32 block-scale grid, transposed like the
  kernel (`[ceil(in/128), ceil(out/128)]`), ready for `Dense.kernel_scale` / `RoutedExperts.*_scale`."""
  return _load(path, cfg, dtype, parts, strict_scales, keep_fp8=True)
