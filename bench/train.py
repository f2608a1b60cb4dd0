"""Training step time, tokens/s and model FLOPs utilisation on this machine.

Two models: the tiny config (configs/tiny_cpu.yaml) and the real-size widths with few layers (SAM 2 blocks,
CLIP 2 layers, decoder 1 dense + 1 MoE layer, real vocabulary), both on synthetic data. The peer figure is this
machine's f32 matmul rate, measured in the same run (jitted 2048^3 GEMM), so MFU = model FLOPs per second / that.

Model FLOPs per step = 3 x forward FLOPs (forward + backward): the decoder's forward is 2 x active parameters
per token (attention and dense projections, k routed + shared experts, router, lm_head; embeddings excluded)
plus the causal attention scores; the vision forward is XLA's cost analysis of `encode_views` at the view size.
Note: on CPU the MoE runs `ragged_dot`, which XLA-CPU lowers to a dense product over every expert, so the
executed FLOPs exceed the model FLOPs in the MoE layers; MFU counts only the model's.

Prints one JSON line last.  Usage: python bench/train.py [--steps 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsocr_jax import config as model_config  # noqa: E402
from train import config as train_config  # noqa: E402
from train import loop  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.environ.get("DSOCR_GOLDEN_DIR", os.path.join(REPO, "..", "shared", "golden"))


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / statistics.median(times) / 1e9


def decoder_forward_flops(d: model_config.DecoderConfig, tokens_per_row: int, rows: int) -> float:
  h = d.hidden_size
  per_token = 0
  for layer in range(d.num_hidden_layers):
    per_token += 4 * h * h  # q, k, v, o
    if d.is_moe_layer(layer):
      per_token += h * d.n_routed_experts + 3 * h * (d.num_experts_per_tok * d.moe_intermediate_size
                                                    + d.shared_intermediate_size)
    else:
      per_token += 3 * h * d.intermediate_size
  per_token += h * d.vocab_size
  attention = d.num_hidden_layers * 2 * tokens_per_row * tokens_per_row * h  # QK^T and PV, causal half x 2
  return rows * (2 * per_token * tokens_per_row + attention)


def vision_forward_flops(model, side: int) -> float:
  views = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
  from flax import nnx
  graphdef, state = nnx.split(model)
  compiled = jax.jit(lambda s, v: nnx.merge(graphdef, s).encode_views(v)).lower(state, views).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", 0.0))


def run(name: str, cfg: train_config.TrainConfig, steps: int, peak_gflops: float) -> dict:
  with tempfile.TemporaryDirectory() as workdir:
    trainer = loop.Trainer(cfg, workdir)
    try:
      t = time.perf_counter()
      first = trainer.train_step()  # compiles
      compile_s = time.perf_counter() - t
      metrics = [trainer.train_step() for _ in range(steps)]
      side = cfg.data.image_size
      vision = vision_forward_flops(trainer.mdef.merge(trainer.state.trainable, trainer.state.frozen,
                                                       trainer.state.rest), side)
    finally:
      trainer.close()
  step_s = statistics.median(m["step_time_s"] for m in metrics)
  rows = cfg.data.batch_size * cfg.optim.grad_accum
  seq = cfg.data.buckets[-1]  # every synthetic example here pads to one bucket
  model_flops = 3 * (decoder_forward_flops(trainer.model_cfg.decoder, seq, rows) + rows * vision)
  trainable, frozen = trainer.num_params()
  return {
      "name": name, "trainable_params": trainable, "frozen_params": frozen, "rows_per_step": rows,
      "seq_len": seq, "first_step_s": round(compile_s, 2), "step_s": round(step_s, 4),
      "tokens_per_s": round(statistics.median(m["tokens_per_s"] for m in metrics), 1),
      "model_gflop_per_step": round(model_flops / 1e9, 3),
      "model_gflops": round(model_flops / step_s / 1e9, 2),
      "mfu_vs_measured_matmul": round(model_flops / step_s / 1e9 / peak_gflops, 4),
      "loss_first": round(first["loss"], 4), "loss_last": round(metrics[-1]["loss"], 4),
  }


def reduced_real_size() -> str:
  """A hub config.json with the released widths and 2 + 2 + 2 layers, written to a temp file."""
  cfg = model_config.preset("deepseek-ocr")
  small = dataclasses.replace(
      cfg, sam=dataclasses.replace(cfg.sam, depth=2, global_attn_indexes=(1,)),
      clip=dataclasses.replace(cfg.clip, layers=2), decoder=dataclasses.replace(cfg.decoder, num_hidden_layers=2))
  path = os.path.join(tempfile.mkdtemp(), "config.json")
  with open(path, "w") as f:
    json.dump(model_config.to_hub_dict(small), f)
  return path


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=4)
  args = p.parse_args()
  tokenizer = os.path.join(GOLDEN, "tokenizer.json")
  common = [f"tokenizer={tokenizer}", "checkpoint.every=1000000", "checkpoint.async_save=false", "eval.batches=0"]
  tiny_yaml = os.path.join(REPO, "configs", "tiny_cpu.yaml")
  peak_before = matmul_gflops()
  results = [run("tiny_cpu", train_config.load(tiny_yaml, common + ["data.buckets=[96]"]), args.steps, peak_before)]
  real = train_config.load(tiny_yaml, common + [
      "model.preset=null", f"model.config={reduced_real_size()}", "data.batch_size=2", "data.buckets=[96]",
      "model.freeze=[embeddings]"])  # the 165 M-row table: keeps Adam state within this 24 GiB machine
  results.append(run("real_width_2_layers", real, args.steps, peak_before))
  peak_after = matmul_gflops()
  with open("/proc/loadavg") as f:
    load = f.read().split()[:3]
  for r in results:
    print(json.dumps(r))
  print(json.dumps({"bench": "train", "backend": jax.default_backend(), "matmul_gflops_f32": round(peak_before, 1),
                    "matmul_gflops_f32_after": round(peak_after, 1), "loadavg": load,
                    **{f"{r['name']}_{k}": r[k] for r in results
                       for k in ("step_s", "tokens_per_s", "model_gflops", "mfu_vs_measured_matmul")}}))


if __name__ == "__main__":
  main()
