"""The converter: a released (or FP8, or PyTorch) checkpoint -> our Orbax checkpoint, or -> an FP8 export.

    python -m dsocr_jax.convert SRC DST [--dtype bfloat16|float32] [--fp8-export] [--mesh SPEC]
                                        [--overwrite] [--no-strict-scales]

SRC: a released-layout directory (config.json, `model.safetensors` or shards + `model.safetensors.index.json`,
tokenizer files), a single `.safetensors` file with config.json beside it, or a PyTorch `.bin`/`.pt` state dict.
FP8 sources (spec 9) are dequantised blockwise. DST: our Orbax layout (`orbax_io`), which `load.load_model`
detects; with `--fp8-export` instead the released layout again with the decoder's linear weights (attention
q/k/v/o, dense MLP, routed and shared experts) as e4m3 + power-of-two 128x128 block scales, as DeepSeek-V3.1
ships them (itself a valid SRC, and servable with FP8 weights kept in memory: `load_model(..., fp8_weights=True)`).

Order of work: the whole manifest is checked against the config before anything is written (one error listing
every problem); tensors are then read one at a time and written in pieces of about one layer into a hidden
temporary directory beside DST, checked once more as stored, and renamed into place. Any failure or interrupt
(Ctrl-C, SIGTERM) removes the temporary directory, so DST either is complete or does not exist; an existing DST
is replaced only with `--overwrite`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from typing import Callable, Sequence

import numpy as np

from dsocr_jax.checkpoint import fp8, hf, keymap, orbax_io
from dsocr_jax.checkpoint.safetensors_io import StreamWriter
from dsocr_jax.config import ModelConfig, load_config, to_hub_dict

DTYPES = {"bfloat16": np.dtype(fp8.ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
# The weights DeepSeek-V3-style FP8 quantises, and the golden FP8 set too: the decoder's 2-D linear weights
# except the router and lm_head.
FP8_EXPORT_NAME = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|"
                             r"mlp\.(experts\.\d+\.|shared_experts\.)?(gate|up|down)_proj)\.weight$")
EXPORT_SHARD = "model-00001-of-000001.safetensors"  # the released checkpoint's (odd) single-shard name
QUANT_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
                "weight_block_size": [fp8.BLOCK, fp8.BLOCK]}


def output_dtype(requested: str | None) -> Callable[[str, np.dtype], np.dtype]:
  """The stored dtype of each tensor: `requested`, or by default the source's (bf16 and f32 kept, f16/f64 ->
  f32, FP8 -> bf16, which is exact for power-of-two block scales: e4m3's 3 mantissa bits fit bf16's 7)."""
  def pick(name: str, src_dtype: np.dtype) -> np.dtype:
    if requested is not None:
      return DTYPES[requested]
    if src_dtype in DTYPES.values():
      return src_dtype
    return DTYPES["bfloat16"] if src_dtype.itemsize == 1 else DTYPES["float32"]
  return pick


class _Progress:
  """tqdm over bytes on a terminal; silent otherwise."""

  def __init__(self, total: int, desc: str, enabled: bool | None = None):
    enabled = sys.stderr.isatty() if enabled is None else enabled
    self.bar = None
    if enabled:
      from tqdm import tqdm
      self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr)

  def update(self, n: int) -> None:
    if self.bar is not None:
      self.bar.update(n)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def _entry_bytes(src: hf.TensorSource, e: keymap.Entry) -> int:
  return sum(src.nbytes(s) for s in e.sources)


def write_orbax(src: hf.TensorSource, cfg: ModelConfig, out: str, dtype: str | None, progress: _Progress) -> dict:
  entries = keymap.manifest(cfg)
  writer = orbax_io.ParamsWriter(os.path.join(out, orbax_io.PARAMS_DIR))
  count = 0
  for v in hf.entry_values(src, entries, output_dtype(dtype)):
    writer.add(v.entry.dst, v.value)
    count += int(v.value.size)
    progress.update(_entry_bytes(src, v.entry))
  writer.finalize()
  orbax_io.check_stored(out, writer.written)  # what Orbax committed is exactly what we handed it
  stored = sorted({str(d) for _, d in writer.written.values()})
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(to_hub_dict(cfg), f, indent=1)
  orbax_io.write_marker(out, dtype=stored[0] if len(stored) == 1 else "mixed", parameters=count,
                        tensors=len(writer.written))
  return {"format": orbax_io.FORMAT, "parameters": count, "tensors": len(writer.written), "dtype": stored}


def _export_tensors(src: hf.TensorSource, cfg: ModelConfig) -> list[str]:
  """Every released tensor name the export writes: the manifest's sources plus the optional ones present."""
  names = list(keymap.source_shapes(keymap.manifest(cfg)))
  return names + [n for n in keymap.OPTIONAL_UNUSED if n in src]


def write_fp8_export(src: hf.TensorSource, cfg: ModelConfig, out: str, dtype: str | None,
                     progress: _Progress) -> dict:
  pick = output_dtype(dtype)
  specs, plan = [], []
  for name in _export_tensors(src, cfg):
    shape = tuple(src.shape(name))
    if FP8_EXPORT_NAME.match(name):
      specs += [(name, fp8.E4M3, shape), (name + hf.SCALE_SUFFIX, np.dtype(np.float32), fp8.scale_shape(shape))]
      plan.append((name, None))
    else:
      src_dt = src.dtype(name)
      out_dt = pick(name, src_dt) if src_dt.kind in "fV" else src_dt  # integer buffers are copied as they are
      specs.append((name, out_dt, shape))
      plan.append((name, out_dt))
  quantised = 0
  with StreamWriter(os.path.join(out, EXPORT_SHARD), specs, {"format": "pt"}) as w:
    for name, out_dt in plan:
      if out_dt is None:
        q, s = fp8.quantize(src.read(name, np.float32))
        w.write(name, q)
        w.write(name + hf.SCALE_SUFFIX, s)
        quantised += 1
      else:
        w.write(name, src.read(name, out_dt))
      progress.update(src.nbytes(name))
  with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": {n: EXPORT_SHARD for n, _, _ in specs}}, f, indent=1)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(dict(to_hub_dict(cfg), quantization_config=QUANT_CONFIG), f, indent=1)
  return {"format": "released-fp8", "fp8_tensors": quantised, "tensors": len(specs)}


def _copy_tokenizer(src_dir: str, out: str) -> list[str]:
  copied = []
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(src_dir, name)):
      shutil.copyfile(os.path.join(src_dir, name), os.path.join(out, name))
      copied.append(name)
  return copied


def _check_mesh(cfg: ModelConfig, spec: str):
  """The mesh of `spec` and the parameters' shardings on it (a bad spec fails before anything is written)."""
  from flax import nnx

  from dsocr_jax import sharding
  from dsocr_jax.checkpoint.load import model_ctor
  mesh = sharding.parse_mesh(spec)
  abstract = nnx.eval_shape(model_ctor(cfg))
  return mesh, nnx.to_pure_dict(sharding.param_shardings(nnx.state(abstract), mesh))


def _commit(tmp: str, dst: str, overwrite: bool) -> None:
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
  if not os.path.exists(dst):
    os.rename(tmp, dst)
    return
  if not overwrite:  # appeared while we were converting
    raise ValueError(f"destination {dst} exists; pass --overwrite to replace it")
  old = tempfile.mkdtemp(dir=os.path.dirname(dst), prefix=f".{os.path.basename(dst)}.old-")
  os.rename(dst, os.path.join(old, "x"))
  os.rename(tmp, dst)
  shutil.rmtree(old, ignore_errors=True)


def convert(src_path: str, dst: str, *, dtype: str | None = None, fp8_export: bool = False, mesh: str | None = None,
            overwrite: bool = False, strict_scales: bool = True, progress: bool | None = None) -> dict:
  """Converts `src_path` into `dst` (see the module docstring). Returns a summary; raises ValueError."""
  if dtype is not None and dtype not in DTYPES:
    raise ValueError(f"dtype: {dtype!r} is not one of {sorted(DTYPES)}")
  if not os.path.exists(src_path):
    raise ValueError(f"source: {src_path} does not exist")
  dst = os.path.abspath(dst)
  if os.path.exists(dst) and not overwrite:
    raise ValueError(f"destination {dst} exists; pass --overwrite to replace it")
  if os.path.realpath(dst) == os.path.realpath(hf.config_dir(src_path)):
    raise ValueError("destination: must not be the source directory")
  cfg = load_config(hf.config_dir(src_path))
  shardings = _check_mesh(cfg, mesh) if mesh else None
  src = hf.open_checkpoint(src_path, strict_scales=strict_scales)
  tmp = None
  started = time.perf_counter()
  try:
    hf.validate(src, keymap.manifest(cfg))
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(dst), prefix=f".{os.path.basename(dst)}.tmp-")
    total = sum(src.nbytes(n) for n in _export_tensors(src, cfg))
    bar = _Progress(total, os.path.basename(dst), progress)
    try:
      write = write_fp8_export if fp8_export else write_orbax
      summary = write(src, cfg, tmp, dtype, bar)
    finally:
      bar.close()
    summary["tokenizer"] = _copy_tokenizer(hf.config_dir(src_path), tmp)
    if shardings is not None and not fp8_export:
      from dsocr_jax.checkpoint import load
      load.restore_orbax_tree(tmp, cfg, shardings=shardings[1])  # every shard lands where the mesh wants it
      summary["mesh"] = mesh
    _commit(tmp, dst, overwrite)
    tmp = None
  finally:
    src.close()
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
  summary.update(src=src_path, dst=dst, seconds=round(time.perf_counter() - started, 3))
  return summary


# ----------------------------------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one readable line, not the usage block
    self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = _Parser(prog="convert", description="Convert a released DeepSeek-OCR checkpoint to our Orbax layout "
              "(or, with --fp8-export, to block-scaled FP8).")
  p.add_argument("src", help="released-layout directory, a .safetensors file (config.json beside it), or a "
                 "PyTorch .bin/.pt state dict")
  p.add_argument("dst", help="output directory (must not exist unless --overwrite)")
  p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                 help="stored floating dtype (default: the source's; FP8 sources -> bfloat16, exact)")
  p.add_argument("--fp8-export", action="store_true",
                 help="write the released layout with the decoder linear weights as e4m3 + UE8M0 block scales")
  p.add_argument("--mesh", default=None, metavar="SPEC",
                 help="check the result by restoring it sharded on this mesh, e.g. 'data=2,expert=4'")
  p.add_argument("--overwrite", action="store_true", help="replace an existing DST (only once the new one is "
                 "complete)")
  p.add_argument("--no-strict-scales", dest="strict_scales", action="store_false",
                 help="accept non-power-of-two block scales under scale_fmt ue8m0")
  p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                 help="progress bar (default: only when stderr is a terminal)")
  return p.parse_args(argv)


def _raise_on_sigterm(signum, frame):
  raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
  try:
    summary = convert(args.src, args.dst, dtype=args.dtype, fp8_export=args.fp8_export, mesh=args.mesh,
                      overwrite=args.overwrite, strict_scales=args.strict_scales, progress=args.progress)
  except (ValueError, OSError) as e:
    lines = str(e).splitlines() or [type(e).__name__]
    print(f"convert: error: {lines[0]}", file=sys.stderr)
    for line in lines[1:]:  # the manifest check lists one problem per line
      print(f"convert:   {line.strip()}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"convert: interrupted; {args.dst} was not written", file=sys.stderr)
    return 130
  finally:
    signal.signal(signal.SIGTERM, previous)
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
