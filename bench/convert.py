"""Converter throughput and memory at the real size: a random bf16 checkpoint in the released layout
(3.34 B parameters, 2,710 tensors, 6.67 GB, one `model-00001-of-000001.safetensors` + index) -> Orbax.

    python bench/convert.py [--cache /tmp/dsocr-bench] [--keep-source]

The source is written once into the cache directory (reused by later runs); the conversion runs in a child
process whose peak RSS (`ru_maxrss`) is reported next to the largest single layer, and its time next to the
floor measured in the same run: reading the same bytes from the same file (before and after; the faster is
used). The converted output is deleted at the end; the source too unless --keep-source. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

from dsocr_jax.checkpoint import convert as convert_mod
from dsocr_jax.checkpoint import keymap
from dsocr_jax.checkpoint.safetensors_io import StreamWriter
from dsocr_jax.config import preset, to_hub_dict

BF16 = np.dtype(ml_dtypes.bfloat16)
POOL = 1 << 25  # elements of random bf16 that every tensor is cut from (cheap to generate, not constant)


def source_specs(cfg) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
  shapes = keymap.source_shapes(keymap.manifest(cfg))
  shapes["model.vision_model.embeddings.patch_embedding.weight"] = (cfg.clip.width, 3, cfg.clip.patch_size,
                                                                    cfg.clip.patch_size)
  return [(name, BF16, shape) for name, shape in shapes.items()]


def write_source(path: str, cfg) -> None:
  specs = source_specs(cfg)
  pool = (np.random.default_rng(0).standard_normal(POOL, np.float32) * 0.02).astype(BF16)
  os.makedirs(path, exist_ok=True)
  shard = convert_mod.EXPORT_SHARD
  offset = 0
  with StreamWriter(os.path.join(path, shard), specs, {"format": "pt"}) as w:
    for name, _, shape in specs:
      w.write(name, np.resize(pool[offset:], int(np.prod(shape))).reshape(shape))
      offset = (offset + 7919) % (POOL // 2)
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": {n: shard for n, _, _ in specs}}, f)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(to_hub_dict(cfg), f)


def read_floor(path: str) -> float:
  """Seconds to read every byte of `path` into a reused 64 MiB buffer."""
  buf = bytearray(64 << 20)
  t = time.perf_counter()
  with open(path, "rb", buffering=0) as f:
    while f.readinto(buf):
      pass
  return time.perf_counter() - t


def largest_layer_bytes(cfg) -> int:
  """Bytes (bf16) of the largest group the converter handles as one piece: a decoder layer or a big tensor."""
  groups: dict[tuple, int] = {}
  for e in keymap.manifest(cfg):
    key = e.dst[:3] if len(e.dst) > 2 and isinstance(e.dst[2], int) else e.dst
    groups[key] = groups.get(key, 0) + 2 * int(np.prod(e.dst_shape))
  return max(groups.values())


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--cache", default="/tmp/dsocr-bench")
  p.add_argument("--keep-source", action="store_true")
  args = p.parse_args()
  cfg = preset("deepseek-ocr")
  specs = source_specs(cfg)
  nbytes = sum(int(np.prod(s)) * 2 for _, _, s in specs)
  src, dst = os.path.join(args.cache, "released-bf16"), os.path.join(args.cache, "orbax")
  shard = os.path.join(src, convert_mod.EXPORT_SHARD)
  os.makedirs(args.cache, exist_ok=True)
  need = nbytes * (1 if os.path.exists(shard) else 2) + (1 << 30)
  free = shutil.disk_usage(args.cache).free
  if free < need:
    print(f"bench: {args.cache} has {free / 1e9:.1f} GB free, needs {need / 1e9:.1f} GB", file=sys.stderr)
    return 1
  if not os.path.exists(shard):
    t = time.perf_counter()
    write_source(src, cfg)
    print(f"wrote {len(specs)} tensors, {nbytes / 1e9:.2f} GB in {time.perf_counter() - t:.1f} s", file=sys.stderr)
  shutil.rmtree(dst, ignore_errors=True)
  floors = [read_floor(shard)]
  t = time.perf_counter()
  child = subprocess.run([sys.executable, "-m", "dsocr_jax.convert", src, dst, "--no-progress"],
                         capture_output=True, text=True)
  seconds = time.perf_counter() - t
  if child.returncode != 0:
    print(child.stderr, file=sys.stderr)
    return 1
  floors.append(read_floor(shard))
  peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
  summary = json.loads(child.stdout.strip().splitlines()[-1])
  out_bytes = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dst) for f in fs)
  shutil.rmtree(dst, ignore_errors=True)
  if not args.keep_source:
    shutil.rmtree(src, ignore_errors=True)
  layer = largest_layer_bytes(cfg)
  floor = min(floors)
  print(json.dumps({
      "bench": "convert", "tensors": len(specs), "source_gb": round(nbytes / 1e9, 3),
      "output_gb": round(out_bytes / 1e9, 3), "parameters": summary["parameters"],
      "seconds": round(seconds, 2), "read_floor_seconds": round(floor, 2),
      "ratio_to_read": round(seconds / floor, 2), "gb_per_s": round(nbytes / 1e9 / seconds, 3),
      "peak_rss_gb": round(peak_rss / 1e9, 3), "largest_layer_gb": round(layer / 1e9, 3),
      "peak_rss_over_largest_layer": round(peak_rss / layer, 2), "loadavg": os.getloadavg()[0]}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
