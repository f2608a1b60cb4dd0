"""Optimizer: AdamW with linear warmup + cosine decay, global-norm clipping, and a weight-decay mask.

Weight decay applies to matrices and convolution kernels only: never to norms' scales, biases (all 1-D) nor to
embedding / position tables (token embeddings, SAM `pos_embed`, CLIP `position_embedding`, SAM relative
position tables), the usual practice for transformers.

Gradient accumulation is done by the loop (train/loop.py), which sums the micro-batch gradients of a loss
already normalised by the whole step's token count, then applies one update here.
"""

from __future__ import annotations

import jax
import optax

from train.config import OptimSection

NO_DECAY_NAMES = frozenset({"embedding", "pos_embed", "position_embedding", "class_embedding", "rel_pos_h",
                            "rel_pos_w", "image_newline", "view_seperator"})


def schedule(cfg: OptimSection, total_steps: int) -> optax.Schedule:
  """Linear warmup from lr / warmup_steps (the first step already learns) to `lr`, then cosine decay to `lr * min_lr_ratio` over `decay_steps`."""
  decay = cfg.decay_steps if cfg.decay_steps is not None else max(1, total_steps - cfg.warmup_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=cfg.lr / max(1, cfg.warmup_steps), peak_value=cfg.lr, warmup_steps=cfg.warmup_steps, decay_steps=cfg.warmup_steps + decay,
      end_value=cfg.lr * cfg.min_lr_ratio)


def decay_mask(params) -> object:
  """True for leaves that get weight decay (a pytree of bools shaped like `params`, a nested dict)."""
  def wants_decay(path, leaf) -> bool:
    name = str(getattr(path[-1], "key", path[-1]))
    return leaf.ndim >= 2 and name not in NO_DECAY_NAMES
  return jax.tree_util.tree_map_with_path(wants_decay, params)


def optimizer(cfg: OptimSection, total_steps: int) -> optax.GradientTransformation:
  parts = []
  if cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts)
