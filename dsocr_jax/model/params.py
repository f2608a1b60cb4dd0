"""The one parameter tree: build a module abstractly (no memory), fill it from a nested dict, cast dtypes.

Checkpoint loading, Orbax restore and random init all end here, so every path yields the same tree.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, object]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def path_str(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def from_tree(ctor: Callable[[], nnx.Module], tree: dict, *, dtype=None) -> nnx.Module:
  """Builds the module `ctor()` without allocating its random init, then sets every parameter from `tree`.

  `tree` must hold exactly the module's parameters with their shapes; anything else is an error that lists
  every mismatch. `dtype` casts floating-point parameters (FP8 storage is kept as is).
  """
  abstract = nnx.eval_shape(ctor)
  graphdef, state = nnx.split(abstract)
  want = flatten(nnx.to_pure_dict(state))
  got = flatten(tree)
  problems = [f"missing: {path_str(k)} {list(v.shape)}" for k, v in want.items() if k not in got]
  problems += [f"unexpected: {path_str(k)}" for k in got if k not in want]
  problems += [f"wrong shape: {path_str(k)}: expected {list(want[k].shape)}, found {list(np.shape(got[k]))}"
               for k in want if k in got and tuple(np.shape(got[k])) != tuple(want[k].shape)]
  if problems:
    raise ValueError("parameter tree does not match the model:\n  " + "\n  ".join(problems))

  def cast(x, ref):
    x = jnp.asarray(x)
    if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize > 1:
      return x.astype(dtype)
    return x.astype(ref.dtype) if x.dtype.itemsize > 1 else x

  nnx.replace_by_pure_dict(state, jax.tree.map(cast, tree, nnx.to_pure_dict(state)))
  return nnx.merge(graphdef, state)


def to_tree(module: nnx.Module) -> dict:
  """The module's parameters as a nested dict of arrays (what Orbax saves)."""
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def count(tree: dict) -> int:
  return int(sum(np.prod(np.shape(v)) for v in flatten(tree).values()))
