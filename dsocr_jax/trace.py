"""Run the whole pipeline once and dump every intermediate under the golden case files' names.

    python -m dsocr_jax.trace --checkpoint DIR --image PAGE.png --prompt $'<image>\\nFree OCR.' \\
        --mode gundam --gen 32 --out trace.npz

open_image -> preprocess -> build_prompt -> DeepEncoder per view size -> 2-D layout -> merge -> decoder
(prefill into a KV cache, then greedy steps). The arrays written (`input_ids`, `images_seq_mask`,
`images_spatial_crop`, `pixel_values` NCHW, `images_crop` NCHW, `sam_global`/`sam_crops` NCHW,
`clip_*`, `proj_*`, `image_features`, `inputs_embeds`, `logits`, and `gen_ids` with `--gen`) compare one to
one with `../shared/golden/cases/*.npz`; with several images the per-view arrays are stacked in image order.
The golden tests call `trace_arrays` directly, so they check this exact path.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsocr_jax import sharding
from dsocr_jax.config import MODES
from dsocr_jax.generate.kv_cache import init_cache
from dsocr_jax.model.ocr import DeepseekOCR, encode_image

View = tuple[np.ndarray, np.ndarray | None, tuple[int, int]]  # (global view [B,B,3], tiles [n,S,S,3], (w, h))


def _nchw(x) -> np.ndarray:
  return np.asarray(x, np.float32).transpose(0, 3, 1, 2)


def vision_arrays(model: DeepseekOCR, views: Sequence[View]) -> tuple[jax.Array, dict[str, np.ndarray]]:
  """Encodes every image: (all images' placeholder vectors `[N, D]` in order, the per-view arrays)."""
  features, parts = [], {k: [] for k in ("sam_global", "clip_global", "proj_global",
                                         "sam_crops", "clip_crops", "proj_crops")}
  for global_view, tiles, spatial_crop in views:
    feats, glob, tile_out = encode_image(model, global_view, tiles, spatial_crop)
    features.append(feats)
    for name, out in (("global", glob), ("crops", tile_out)):
      if out is not None:
        parts[f"sam_{name}"].append(_nchw(out.sam))
        parts[f"clip_{name}"].append(np.asarray(out.clip, np.float32))
        parts[f"proj_{name}"].append(np.asarray(out.proj, np.float32))
  arrays = {k: np.concatenate(v) for k, v in parts.items() if v}
  return jnp.concatenate(features, axis=0), arrays


@functools.partial(jax.jit, static_argnums=0)
def _prefill(graphdef, state, input_ids, images_seq_mask, image_features, cache):
  model = nnx.merge(graphdef, state)
  embeds = model.embed(input_ids, image_features, images_seq_mask)
  positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
  out = model.decoder(embeds, positions, cache=cache)
  return embeds, out.logits, out.cache


@functools.partial(jax.jit, static_argnums=0)
def _decode_step(graphdef, state, token, position, cache):
  out = nnx.merge(graphdef, state)(token, position, cache=cache)
  return out.logits[:, -1], out.cache


def decoder_arrays(model: DeepseekOCR, input_ids: np.ndarray, images_seq_mask: np.ndarray,
                   image_features: jax.Array | None, gen: int = 0) -> dict[str, np.ndarray]:
  """Merged embeddings and prompt logits for one prompt; with gen > 0 also `gen` greedy tokens (KV cache,
  positions continuing from T, no EOS stop, no n-gram blocking)."""
  t = int(input_ids.shape[0])
  max_pos = model.cfg.decoder.max_position_embeddings
  if t + gen > max_pos:
    raise ValueError(f"gen: prompt ({t} tokens) + {gen} generated tokens exceed max_position_embeddings {max_pos}")
  graphdef, state = nnx.split(model)
  ids = jnp.asarray(input_ids, jnp.int32)[None]
  mask = jnp.asarray(images_seq_mask, bool)[None]
  feats = None if image_features is None else jnp.asarray(image_features)[None]
  embeds, logits, cache = _prefill(graphdef, state, ids, mask, feats, init_cache(model.cfg.decoder, 1, t + gen, model.dtype))
  out = {"inputs_embeds": np.asarray(embeds[0], np.float32), "logits": np.asarray(logits[0], np.float32)}
  if gen > 0:
    tokens, next_logits = [], logits[:, -1]
    for step in range(gen):
      token = jnp.argmax(next_logits, axis=-1).astype(jnp.int32)
      tokens.append(token)
      if step + 1 < gen:
        next_logits, cache = _decode_step(graphdef, state, token[:, None], jnp.full((1, 1), t + step, jnp.int32),
                                          cache)
    out["gen_ids"] = np.asarray(jnp.stack(tokens, axis=1)[0], np.int64)
  return out


def trace_arrays(model: DeepseekOCR, input_ids: np.ndarray, images_seq_mask: np.ndarray, views: Sequence[View],
                 gen: int = 0) -> dict[str, np.ndarray]:
  """Every intermediate for one prompt and its images, under the golden names."""
  n_mask = int(np.sum(images_seq_mask))
  features, arrays = vision_arrays(model, views) if views else (None, {})
  n_feat = 0 if features is None else int(features.shape[0])
  if n_feat != n_mask:
    raise ValueError(f"images_seq_mask: {n_mask} image positions but the images give {n_feat} vectors")
  if features is not None:
    arrays["image_features"] = np.asarray(features, np.float32)
  arrays.update(decoder_arrays(model, input_ids, images_seq_mask, features, gen))
  arrays["input_ids"] = np.asarray(input_ids, np.int64)
  arrays["images_seq_mask"] = np.asarray(images_seq_mask, bool)
  return arrays


# ----------------------------------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one readable line, not the usage block
    self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = _Parser(prog="trace", description="Run DeepSeek-OCR once and write every intermediate to an .npz.")
  p.add_argument("--checkpoint", required=True, help="released-layout checkpoint directory")
  p.add_argument("--image", action="append", required=True, help="image file (repeat for several <image>)")
  p.add_argument("--prompt", required=True, help="prompt text with one <image> per --image")
  p.add_argument("--mode", required=True, choices=sorted(MODES))
  p.add_argument("--max-crops", type=int, default=6, help="tile limit in crop modes (6 vLLM, 9 hub infer)")
  p.add_argument("--gen", type=int, default=0, help="greedy tokens to generate (writes gen_ids)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--out", required=True, help="output .npz file")
  sharding.add_mesh_argument(p)
  args = p.parse_args(argv)
  if args.gen < 0:
    p.error(f"argument --gen: must be >= 0, got {args.gen}")
  args.device_mesh = sharding.mesh_from_args(args, p) if args.mesh else None
  if not os.path.isdir(args.checkpoint):
    p.error(f"argument --checkpoint: {args.checkpoint} is not a directory")
  for path in args.image:
    if not os.path.isfile(path):
      p.error(f"argument --image: {path} does not exist")
  out_dir = os.path.dirname(os.path.abspath(args.out))
  if not os.path.isdir(out_dir):
    p.error(f"argument --out: directory {out_dir} does not exist")
  return args


def save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Atomic write: a temporary file in the same directory, then rename."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".npz.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def run(args: argparse.Namespace) -> dict[str, np.ndarray]:
  from dsocr_jax.checkpoint.load import load_model
  from dsocr_jax.image.decode import open_image
  from dsocr_jax.image.preprocess import preprocess
  from dsocr_jax.text.prompt import build_prompt
  from dsocr_jax.text.tokenizer import Tokenizer

  images = [preprocess(open_image(path), args.mode, max_crops=args.max_crops) for path in args.image]
  tokenizer = Tokenizer.from_checkpoint(args.checkpoint)
  loaded = load_model(args.checkpoint, dtype=jnp.dtype(args.dtype))
  if args.device_mesh is not None:  # parameters sharded by the logical-axis rules, experts over `expert`
    sharding.distribute(loaded.model, args.device_mesh)
  prompt = build_prompt(args.prompt, images, tokenizer)
  views = [(im.global_view, im.tiles, im.spatial_crop) for im in images]
  arrays = trace_arrays(loaded.model, prompt.input_ids, prompt.images_seq_mask, views, gen=args.gen)
  arrays["pixel_values"] = _nchw(np.stack([im.global_view for im in images]))
  arrays["images_crop"] = _nchw(np.concatenate([im.tiles for im in images]))
  arrays["images_spatial_crop"] = np.asarray(prompt.images_spatial_crop, np.int64)
  return arrays


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  if args.dtype == "float32":
    # A trace is compared with float32 references: no reduced-precision matmul passes (TF32 / bf16) on GPU/TPU.
    jax.config.update("jax_default_matmul_precision", "highest")
  try:
    arrays = run(args)
    save_npz(args.out, arrays)
  except (ValueError, OSError) as e:
    print(f"trace: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in sorted(arrays.items()))
  print(f"trace: wrote {args.out}: {shapes}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
