"""Shared by the sharding tests, the 2-process workers and their single-process reference.

The golden decoder, golden cases padded to one batch, the next-token loss and one SGD step. Kept free of
pytest and conftest so that the worker processes (plain python) can import it.
"""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsocr_jax.checkpoint import hf
from dsocr_jax.config import load_config
from dsocr_jax.model import moe, params
from dsocr_jax.model.decoder import Decoder

GOLDEN_DIR = os.environ.get("DSOCR_GOLDEN_DIR",
                            os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "golden"))


def case_paths() -> list[str]:
  return sorted(glob.glob(os.path.join(GOLDEN_DIR, "cases", "*.npz")))


def make_decoder() -> Decoder:
  cfg = load_config(GOLDEN_DIR)
  tree = hf.load_params(GOLDEN_DIR, cfg, parts=("decoder",))
  return params.from_tree(lambda: Decoder(cfg.decoder, rngs=nnx.Rngs(0)), tree["decoder"])


def ragged_local_dispatch(experts: moe.RoutedExperts, x, weights, ids):
  """moe.py's single-device steps with the `ragged_dot` FFN: the differentiable form on CPU, where the default
  segment loop (dynamic trip count) cannot be reverse-differentiated."""
  order, token_of_row, group_sizes = moe.sort_by_expert(ids, experts.num_experts)
  return moe.combine(experts(x[token_of_row], group_sizes, impl="ragged"), order, token_of_row, weights, x.shape[0])


def make_trainable_decoder() -> Decoder:
  """The golden decoder on one device, differentiable on CPU."""
  model = make_decoder()
  for _, m in nnx.iter_modules(model):
    if isinstance(m, moe.MoE):
      m.dispatch = ragged_local_dispatch
  return model


def padded_batch(paths: list[str]):
  """Cases padded to one length (a multiple of 8): embeds [B,T,D] f32, ids [B,T] i32, lengths [B] i32, cases."""
  if not paths:
    raise FileNotFoundError(f"no golden cases under {GOLDEN_DIR}/cases")
  cases = [np.load(p) for p in paths]
  t = -(-max(len(c["input_ids"]) for c in cases) // 8) * 8
  embeds = np.zeros((len(cases), t, cases[0]["inputs_embeds"].shape[1]), np.float32)
  ids = np.zeros((len(cases), t), np.int32)
  for i, c in enumerate(cases):
    embeds[i, :len(c["input_ids"])] = c["inputs_embeds"]
    ids[i, :len(c["input_ids"])] = c["input_ids"]
  return embeds, ids, np.array([len(c["input_ids"]) for c in cases], np.int32), cases


def next_token_loss(model, embeds, ids, lengths):
  """(mean next-token cross-entropy over the real positions, logits)."""
  positions = jnp.broadcast_to(jnp.arange(embeds.shape[1]), embeds.shape[:2])
  logits = model(embeds, positions).logits
  mask = jnp.arange(ids.shape[1] - 1)[None] < (lengths[:, None] - 1)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum(nll * mask) / jnp.sum(mask), logits


@nnx.jit
def loss_grads(model, embeds, ids, lengths):
  return nnx.grad(next_token_loss, has_aux=True)(model, embeds, ids, lengths)[0]


@nnx.jit(static_argnums=4)
def sgd_step(model, embeds, ids, lengths, lr: float):
  """One plain SGD step in place; returns (loss, logits) before the step."""
  (loss, logits), grads = nnx.value_and_grad(next_token_loss, has_aux=True)(model, embeds, ids, lengths)
  nnx.update(model, jax.tree.map(lambda p, g: p - lr * g, nnx.state(model, nnx.Param), grads))
  return loss, logits
