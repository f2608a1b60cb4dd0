"""`python -m train --config FILE [--workdir DIR] [--steps N] [--init CHECKPOINT] [--mesh SPEC] [key=value ...]`

Trains until global step N (default: the config's `steps`); rerunning in the same workdir resumes from its
newest checkpoint, so a larger N continues the run. `key=value` overrides any config entry by its dotted name
(`optim.lr=3e-4`, `data.batch_size=8`, `model.freeze=[sam,clip]`). A bad config ends with one line naming the
key and a non-zero exit.
"""

from __future__ import annotations

import argparse
import logging
import sys


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, help="training config (YAML), e.g. configs/tiny_cpu.yaml")
  p.add_argument("--workdir", default="runs/default", help="checkpoints and metrics.jsonl go here")
  p.add_argument("--steps", type=int, default=None, help="train until this global step (resumes below it)")
  p.add_argument("--init", default=None, help="start from this converted or released checkpoint directory")
  p.add_argument("--mesh", default=None, help="device mesh, e.g. 'data=2,expert=4' (dsocr_jax.sharding)")
  p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides by dotted name")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "jax._src.xla_bridge"):  # Orbax logs every save at INFO through absl
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from train import config as config_lib
  from train import loop
  try:
    extra = {}
    if args.init is not None:
      extra["model"] = {"init": args.init}
    if args.mesh is not None:
      extra["mesh"] = args.mesh
    cfg = config_lib.load(args.config, args.overrides, extra=extra)
    if args.steps is not None and args.steps < 0:
      raise ValueError("--steps: must be >= 0")
    loop.maybe_initialize_distributed()
    mesh = None
    if cfg.mesh is not None:
      from dsocr_jax import sharding
      mesh = sharding.parse_mesh(cfg.mesh)
    loop.train(cfg, args.workdir, stop_at=args.steps, mesh=mesh)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
