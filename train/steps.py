"""The jitted pieces of a training step, as pure functions of (parameters, batch arrays, static layout).

Parameters travel as two nested dicts: `trainable` (what the optimizer updates) and `frozen` (the rest of the
nnx.Params: frozen parts of the model). Inside a jitted function they become the module again with
`nnx.merge`. The image layout of a batch (which rows share one image geometry, and their tile grids) is static:
one compilation per (length bucket, layout), a handful in practice.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from train import loss as losses


@dataclasses.dataclass(frozen=True)
class ModelDef:
  """What is static about the model: hashable, passed to jit as a static argument."""
  graphdef: Any
  trainable_def: Any  # treedef of the trainable nnx.State (its leaves are in the same order as the dict's)
  frozen_def: Any
  rest_def: Any
  num_experts: int
  aux_alpha: float
  expert_parallel: bool

  def merge(self, trainable: dict, frozen: dict, rest: list) -> nnx.Module:
    def state(treedef, tree):
      return jax.tree.unflatten(treedef, jax.tree.leaves(tree))
    return nnx.merge(self.graphdef, state(self.trainable_def, trainable), state(self.frozen_def, frozen),
                     state(self.rest_def, rest))


def batch_image_features(model, images: list, layout: tuple, batch_size: int) -> jax.Array | None:
  """`[B, N, D]` image vectors for every row (rows with fewer image tokens are zero-padded), or None.

  `images[g]` holds, for group g of rows with identical geometry, one (global views `[n, B, B, 3]`, tiles
  `[n, t, S, S, 3]`) pair per image of the prompt; `layout[g]` = (rows, tile grid of each image).
  """
  if not layout:
    return None
  per_group = []
  for (rows, crops), views in zip(layout, images):
    parts = []
    for (global_views, tiles), crop in zip(views, crops):
      proj_global = model.encode_views(global_views)[2]  # [n, g*g, D]
      proj_tiles = None
      if tiles.shape[1] > 0:
        n, t = tiles.shape[:2]
        proj_tiles = model.encode_views(tiles.reshape((n * t,) + tiles.shape[2:]))[2]
        proj_tiles = proj_tiles.reshape((n, t) + proj_tiles.shape[1:])
      parts.append(jax.vmap(lambda g, tl, crop=crop: model.layout(g, tl, crop))(proj_global, proj_tiles))
    per_group.append((rows, jnp.concatenate(parts, axis=1)))
  n_max = max(f.shape[1] for _, f in per_group)
  out = jnp.zeros((batch_size, n_max, per_group[0][1].shape[-1]), per_group[0][1].dtype)
  for rows, f in per_group:
    f = jnp.pad(f, ((0, 0), (0, n_max - f.shape[1]), (0, 0)))
    out = out.at[jnp.asarray(rows)].set(f)
  return out


def _dropped(model, mdef: ModelDef) -> jax.Array:
  if not mdef.expert_parallel:
    return jnp.zeros((), jnp.int32)
  from dsocr_jax import expert_parallel
  return expert_parallel.dropped_assignments(model)


def _forward_losses(mdef: ModelDef, trainable, frozen, rest, arrays, layout):
  model = mdef.merge(trainable, frozen, rest)
  b = arrays["input_ids"].shape[0]
  feats = batch_image_features(model, arrays["images"], layout, b)
  out = model(arrays["input_ids"], arrays["positions"], image_features=feats,
              images_seq_mask=arrays["images_seq_mask"] if feats is not None else None, valid=arrays["valid"])
  ce_sum, count = losses.cross_entropy_sum(out.logits, arrays["targets"], arrays["loss_mask"])
  aux = losses.aux_loss(out.router, arrays["valid"], mdef.num_experts, mdef.aux_alpha)
  return ce_sum, count, aux, _dropped(model, mdef)


def _grad(mdef: ModelDef, trainable, frozen, rest, arrays, ce_scale, aux_scale, layout):
  """Gradient of ce_sum * ce_scale + aux * aux_scale w.r.t. the trainable parameters, and the raw figures."""
  def objective(tr):
    ce_sum, count, aux, dropped = _forward_losses(mdef, tr, frozen, rest, arrays, layout)
    return ce_sum * ce_scale + aux * aux_scale, dict(ce_sum=ce_sum, count=count, aux=aux, dropped=dropped)
  grads, figures = jax.grad(objective, has_aux=True)(trainable)
  return grads, figures


grad_step = jax.jit(_grad, static_argnames=("mdef", "layout"))


@jax.jit
def add_trees(a, b):
  return jax.tree.map(jnp.add, a, b)


def _eval_losses(mdef, trainable, frozen, rest, arrays, layout):
  ce_sum, count, aux, _ = _forward_losses(mdef, trainable, frozen, rest, arrays, layout)
  return ce_sum, count, aux


eval_step = jax.jit(_eval_losses, static_argnames=("mdef", "layout"))


def _greedy(mdef: ModelDef, trainable, frozen, rest, arrays, prompt_lens, layout, max_new: int, eos_id: int,
            pad_id: int):
  """Greedy continuation of each row's prompt (its first prompt_lens[b] tokens): `[B, max_new]` ids, pad after
  EOS. Recomputes the whole (fixed-length) sequence per token: simple and one compilation, fine for eval."""
  model = mdef.merge(trainable, frozen, rest)
  ids = arrays["input_ids"]
  b, t = ids.shape
  feats = batch_image_features(model, arrays["images"], layout, b)
  mask = arrays["images_seq_mask"] if feats is not None else None
  pos = jnp.arange(t)[None, :]
  ids = jnp.where(pos < prompt_lens[:, None], ids, pad_id)
  rows = jnp.arange(b)

  def body(i, carry):
    ids, out, done = carry
    cur = prompt_lens - 1 + i  # position whose logits give the next token
    logits = model(ids, arrays["positions"], image_features=feats, images_seq_mask=mask,
                   logits_at=jnp.minimum(cur, t - 1)).logits[:, 0]
    tok = jnp.where(done, pad_id, jnp.argmax(logits, axis=-1).astype(ids.dtype))
    ids = ids.at[rows, jnp.minimum(cur + 1, t - 1)].set(jnp.where(cur + 1 < t, tok, ids[rows, t - 1]))
    return ids, out.at[:, i].set(tok), done | (tok == eos_id)

  out = jnp.full((b, max_new), pad_id, ids.dtype)
  _, out, _ = jax.lax.fori_loop(0, max_new, body, (ids, out, jnp.zeros((b,), bool)))
  return out


greedy_decode = jax.jit(_greedy, static_argnames=("mdef", "layout", "max_new", "eos_id", "pad_id"))
