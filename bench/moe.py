"""One real-size MoE layer (DecoderConfig() defaults: H 1280, 64 experts of 896, top-6, 2 shared) at 4k tokens:
one device vs expert parallelism over 8 simulated CPU devices (dropless, and capacity factor 1.25).

The three variants run interleaved in one process (A B C A B C ..., medians) that has 8 XLA CPU devices; the
single-device variant is the plain layer on device 0. Simulated devices share this machine's cores, so the
expert-parallel times measure overhead (sort, buffers, all-to-all copies), not a speed-up. Memory is per
device: parameter bytes held, and XLA's compiled temp + argument sizes. The all-to-all volume is what one
device sends per layer forward (both all-to-alls), whole dense buffer vs the rows that carry tokens.

usage: python bench/moe.py [--tokens 4096] [--repeats 3]      (prints a JSON line last)
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dsocr_jax import expert_parallel, sharding  # noqa: E402
from dsocr_jax.config import DecoderConfig  # noqa: E402
from dsocr_jax.model.moe import MoE  # noqa: E402

CPU_GFLOPS = 187.0  # ../shared/perf-notes.md: f32 GEMM on this machine


def layer_flops(cfg: DecoderConfig, tokens: int) -> float:
  routed = tokens * cfg.num_experts_per_tok * 3 * 2 * cfg.hidden_size * cfg.moe_intermediate_size
  shared = tokens * 3 * 2 * cfg.hidden_size * cfg.shared_intermediate_size
  router = tokens * 2 * cfg.hidden_size * cfg.n_routed_experts
  return float(routed + shared + router)


def compiled_memory(model, x) -> dict:
  """XLA's per-device memory of the compiled layer (for a sharded program: one device's partition)."""
  graphdef, state = nnx.split(model)
  compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0]).lower(state, x).compile()
  m = compiled.memory_analysis()
  return {"temp_bytes": int(m.temp_size_in_bytes), "argument_bytes": int(m.argument_size_in_bytes)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tokens", type=int, default=4096)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  if jax.device_count() != 8:
    raise SystemExit(f"error: expected 8 simulated devices, found {jax.device_count()}")
  cfg = DecoderConfig()
  x = jax.random.normal(jax.random.key(1), (1, args.tokens, cfg.hidden_size), jnp.float32)

  single = MoE(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  state = nnx.state(single)
  mesh = sharding.parse_mesh("expert=8")
  variants = {"single": single}
  for name, cf in (("ep_dropless", None), ("ep_capacity_1.25", 1.25)):
    m = MoE(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    nnx.update(m, state)
    sharding.shard_module(m, mesh)
    m.dispatch = nnx.data(expert_parallel.ExpertParallelDispatch(mesh, cfg.n_routed_experts, capacity_factor=cf))
    variants[name] = m

  def run(model, x):
    return model(x)[0]

  fns = {name: nnx.jit(run) for name in variants}
  outs = {name: np.asarray(fns[name](m, x)) for name, m in variants.items()}  # compile + warm up
  times = {name: [] for name in variants}
  for _ in range(args.repeats):
    for name, m in variants.items():
      t = time.perf_counter()
      jax.block_until_ready(fns[name](m, x))
      times[name].append(time.perf_counter() - t)

  result = {"bench": "moe_layer", "tokens": args.tokens, "devices": 8,
            "loadavg": open("/proc/loadavg").read().split()[:3]}
  floor_s = layer_flops(cfg, args.tokens) / (CPU_GFLOPS * 1e9)
  result["flop_floor_ms"] = round(floor_s * 1e3, 1)
  for name, m in variants.items():
    med = statistics.median(times[name])
    w = m.experts.gate_proj[...]
    routed_bytes = 3 * max(sharding.per_device_bytes(w).values())
    result[name] = {"median_ms": round(med * 1e3, 1), "vs_floor": round(med / floor_s, 2),
                    "routed_param_bytes_per_device": routed_bytes, **compiled_memory(m, x),
                    "max_abs_diff_vs_single": float(np.abs(outs[name] - outs["single"]).max())}
    if name != "single":
      cf = m.dispatch.capacity_factor
      result[name]["all_to_all"] = expert_parallel.all_to_all_bytes(
          args.tokens, cfg.hidden_size, cfg.num_experts_per_tok, cfg.n_routed_experts, 8, 8, 4, cf)
      result[name]["dropped_assignments"] = int(m.dispatch.dropped[...])
      result[name]["time_vs_single"] = round(med / statistics.median(times["single"]), 2)
  for name in variants:
    print(f"{name:>18}: {json.dumps(result[name])}")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
