"""The real-size decoder (random bf16 weights) builds and runs one forward over 300 tokens; reports memory.

  python bench/real_size.py [--tokens 300] [--dtype bfloat16]

Prints the parameter count, build time, forward time, and peak RSS (ru_maxrss) against the weights' bytes;
JSON line last. Random weights come from a fast numpy generator (not the model's init), so building costs
about what loading a checkpoint costs.
"""

import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsocr_jax.config import preset
from dsocr_jax.model import params
from dsocr_jax.model.decoder import Decoder


def random_tree(abstract_tree: dict, dtype, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)

  def fill(x):
    a = rng.standard_normal(x.shape, np.float32)
    a *= 0.02
    return jnp.asarray(a, dtype)

  return jax.tree.map(fill, abstract_tree)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tokens", type=int, default=300)
  ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  args = ap.parse_args()
  dtype = jnp.dtype(args.dtype)
  cfg = preset("deepseek-ocr").decoder

  t0 = time.perf_counter()
  ctor = lambda: Decoder(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(ctor), nnx.Param))
  tree = random_tree(abstract, dtype)
  dec = params.from_tree(ctor, tree)
  del tree
  build_s = time.perf_counter() - t0
  n_params = params.count(params.to_tree(dec))

  graphdef, state = nnx.split(dec)

  @jax.jit
  def forward(state, embeds):
    d = nnx.merge(graphdef, state)
    pos = jnp.arange(embeds.shape[1])[None]
    return d(embeds, pos).logits

  embeds = jax.random.normal(jax.random.key(1), (1, args.tokens, cfg.hidden_size), dtype)
  t0 = time.perf_counter()
  logits = forward(state, embeds).block_until_ready()
  first_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  logits = forward(state, embeds).block_until_ready()
  fwd_s = time.perf_counter() - t0
  assert logits.shape == (1, args.tokens, cfg.vocab_size) and bool(jnp.isfinite(logits).all())
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  weight_bytes = n_params * dtype.itemsize
  print(f"decoder params {n_params:,} ({weight_bytes / 2**30:.2f} GiB as {args.dtype}); build {build_s:.1f}s; "
        f"forward {args.tokens} tokens: first (with compile) {first_s:.1f}s, second {fwd_s:.2f}s; "
        f"peak RSS {peak / 2**30:.2f} GiB")
  print(json.dumps(dict(bench="real_size_decoder", dtype=args.dtype, tokens=args.tokens, params=n_params,
                        build_s=round(build_s, 2), forward_compile_s=round(first_s, 2), forward_s=round(fwd_s, 3),
                        peak_rss_gib=round(peak / 2**30, 3), weights_gib=round(weight_bytes / 2**30, 3),
                        peak_over_weights=round(peak / weight_bytes, 3), loadavg=open("/proc/loadavg").read().split()[:3])))


if __name__ == "__main__":
  main()
