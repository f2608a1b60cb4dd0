"""Training objective: next-token cross-entropy on the answer (+ final EOS), and the MoE balancing loss.

The data pipeline marks in `loss_mask[b, t]` the positions whose prediction (of token t+1, `targets[b, t]`) is
an answer token or the closing EOS; prompt text, image placeholders and padding never count. The cross-entropy
is returned as a SUM over counted tokens with the count, so that gradient accumulation can divide the whole
optimizer step by its total token count (each token weighs the same, whatever micro-batch it sits in).

The auxiliary loss is DeepSeek-V2's sequence-level balance loss (`moe.load_balancing_loss`, hub `MoEGate` with
`seq_aux=True`) summed over the MoE layers, as the hub adds one `AddAuxiliaryLoss` per layer, times
`aux_loss_alpha`. We compute it over the valid (non-padding) positions of each row; the hub, which trains
without padding masks, includes every position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsocr_jax.model import moe


def cross_entropy_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum over masked positions of -log softmax(logits)[target], number of masked positions), in float32.

  logits `[B, T, V]`, targets `[B, T]` int, mask `[B, T]` bool.
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  m = mask.astype(jnp.float32)
  return jnp.sum((log_z - target_logit) * m), jnp.sum(m)


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean cross-entropy per counted token (0 when nothing is counted)."""
  total, count = cross_entropy_sum(logits, targets, mask)
  return total / jnp.maximum(count, 1.0)


def aux_loss(router: list[moe.RouterInfo], valid: jax.Array, num_experts: int, alpha: float) -> jax.Array:
  """alpha * sum over MoE layers of the sequence-level balance loss (0 for a model without MoE layers)."""
  total = jnp.zeros((), jnp.float32)
  for info in router:
    total = total + moe.load_balancing_loss(info, valid, num_experts)
  return alpha * total
