"""Training checkpoints with Orbax: parameters, optimizer state, step, RNG and the data iterator, per step.

Layout under `WORKDIR/checkpoints/<step>/` (an Orbax CheckpointManager):
  params     every nnx.Param of the model as one nested dict: the same tree as `params.to_tree(model)`, so a
             training checkpoint is also a complete model;
  opt_state  the optax state of the trainable parameters;
  train      {step, rng};
  data       the grain iterator state (JSON);
  meta       the training config and the step (JSON, for people and tools).

Saves are asynchronous (the step continues while the files are written); `keep` bounds how many are kept.
`restore` walks back from the newest step when one cannot be read (a crash mid-write on a file system without
atomic renames, a deleted file), with a warning naming what failed.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from train.config import CheckpointSection

log = logging.getLogger(__name__)
ITEMS = ("params", "opt_state", "train", "data", "meta")


def _abstract(tree):
  """Restore target: shapes, dtypes and shardings of a live tree, so Orbax rebuilds the same pytree."""
  def one(x):
    x = x if isinstance(x, jax.Array) else np.asarray(x)
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree.map(one, tree)


class Checkpointer:

  def __init__(self, workdir: str, cfg: CheckpointSection):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, *, params: dict, opt_state: Any, train: dict, data: dict, meta: dict,
           force: bool = False) -> bool:
    """Starts an (asynchronous) save of `step`; returns whether one was started."""
    if step in self.manager.all_steps():
      return False
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
        train=ocp.args.StandardSave(train), data=ocp.args.JsonSave(data), meta=ocp.args.JsonSave(meta))
    return self.manager.save(step, args=args, force=force)

  def restore(self, *, params: dict, opt_state: Any, train: dict) -> tuple[int, dict] | None:
    """The newest readable checkpoint restored into trees shaped like the given ones, as
    (step, {params, opt_state, train, data, meta}); None when there is no checkpoint at all."""
    steps = self.steps()
    failures = []
    for step in reversed(steps):
      args = ocp.args.Composite(
          params=ocp.args.StandardRestore(_abstract(params)),
          opt_state=ocp.args.StandardRestore(_abstract(opt_state)),
          train=ocp.args.StandardRestore(_abstract(train)), data=ocp.args.JsonRestore(),
          meta=ocp.args.JsonRestore())
      try:
        restored = self.manager.restore(step, args=args)
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back to an older one
        failures.append(step)
        log.warning("checkpoint: cannot restore step %d from %s (%s: %s); trying an older one", step,
                    self.directory, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        continue
      if failures:
        log.warning("checkpoint: resumed from step %d; unreadable newer step(s): %s", step, failures)
      return step, {name: restored[name] for name in ITEMS}
    if steps:
      raise ValueError(f"checkpoint: none of the checkpoints in {self.directory} ({steps}) can be read")
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
