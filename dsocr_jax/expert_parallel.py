"""Expert parallelism: the routed experts split over the mesh's `expert` axis, tokens moved by all-to-all.

`enable_expert_parallel(model, mesh)` sets every MoE layer's `dispatch` hook to an `ExpertParallelDispatch`.
Inside `jax.shard_map`, each device holds a distinct slice of the tokens (split over every mesh axis) and
`E / P` experts (P = size of `expert`). Per device, with n local tokens and k choices (R = n k rows):

1. sort its rows by expert (`moe.sort_by_expert`); the experts of device j are [j E/P, (j+1) E/P), so the rows
   bound for each device are contiguous;
2. write them into a send buffer `[P, S, H]` (block j goes to device j) with each row's local expert id;
3. `all_to_all` over `expert`; regroup the received rows by local expert; run the local experts with moe.py's
   grouped FFN (segment loop on CPU, `ragged_dot` elsewhere); `all_to_all` back;
4. read each row's result from where it was sent and `moe.combine` with the router weights.

Buffer size S:
* dropless (inference, `capacity_factor=None`): S = R, the worst case (every local row to one device). The
  segment loop computes only the filled rows, but the transfer moves the whole buffer: P R H elements per
  device, P times the useful volume. `jax.lax.ragged_all_to_all` would send only the filled rows, but XLA:CPU
  does not implement it (jax 0.10.2: "HLO opcode ragged-all-to-all is not supported by XLA:CPU"), so the dense
  form is the one we can test here; see docs/scaling.md for the volumes.
* capacity (training): C = ceil(capacity_factor * R / E) rows per (source device, expert), S = (E/P) C. Rows
  past an expert's capacity are dropped (their contribution is 0, the shared experts still apply); kept rows
  are the earliest tokens of the device. The number of dropped (token, expert) assignments of the last call,
  summed over devices, is the `dropped` variable of each dispatch (`dropped_assignments(model)`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from dsocr_jax import sharding
from dsocr_jax.model import moe


class DroppedAssignments(nnx.Variable):
  """(token, expert) assignments dropped by the capacity limit in the last call (a metric, not trained)."""


def _send_slots(sorted_ids: jax.Array, group_sizes: jax.Array, num_devices: int, capacity: int | None):
  """For rows sorted by expert: (destination block slot or -1 when dropped, rank of the row in its expert)."""
  rows = sorted_ids.shape[0]
  local_experts = group_sizes.shape[0] // num_devices
  idx = jnp.arange(rows, dtype=jnp.int32)
  expert_start = jnp.cumsum(group_sizes) - group_sizes
  rank_in_expert = idx - expert_start[sorted_ids]
  if capacity is None:
    per_device = group_sizes.reshape(num_devices, local_experts).sum(axis=1)
    device_start = jnp.cumsum(per_device) - per_device
    return idx - device_start[sorted_ids // local_experts], rank_in_expert
  slot = (sorted_ids % local_experts) * capacity + rank_in_expert
  return jnp.where(rank_in_expert < capacity, slot, -1), rank_in_expert


def _local_experts_ffn(experts: moe.RoutedExperts, rows: jax.Array, local_ids: jax.Array, num_local: int,
                       expected_rows: int, impl: str) -> jax.Array:
  """Applies local expert `local_ids[r]` to `rows[r]`; rows with id == num_local (empty slots) give 0."""
  order = jnp.argsort(local_ids, stable=True)
  group_sizes = jnp.bincount(local_ids, length=num_local + 1)[:num_local].astype(jnp.int32)
  x = rows[order].astype(experts.dtype)
  if impl == "ragged":
    y = moe.grouped_ffn_ragged(x, group_sizes, experts.stacked())
  elif impl == "segments":
    y = moe.grouped_ffn_segments(x, group_sizes, experts.expert, num_local,
                                 chunk=moe.chunk_size_for(expected_rows, num_local))
  else:
    raise ValueError(f"expert parallel impl: unknown implementation {impl!r} (expected 'ragged' or 'segments')")
  y = jnp.where((local_ids[order] < num_local)[:, None], y, 0)
  return jnp.zeros_like(y).at[order].set(y)


class ExpertParallelDispatch(nnx.Module):
  """A `MoE.dispatch` that runs the routed experts split over the mesh's `expert` axis."""

  def __init__(self, mesh: Mesh, num_experts: int, *, capacity_factor: float | None = None,
               impl: str | None = None):
    ep = mesh.shape[sharding.EXPERT]
    if num_experts % ep:
      raise ValueError(f"expert parallel: {num_experts} routed experts cannot be split over expert={ep} devices")
    if capacity_factor is not None and not capacity_factor > 0:
      raise ValueError(f"expert parallel: capacity_factor must be > 0, got {capacity_factor}")
    self.mesh = mesh
    self.num_experts = num_experts
    self.capacity_factor = capacity_factor
    self.impl = impl
    self.dropped = DroppedAssignments(jnp.zeros((), jnp.int32))

  def buffer_rows(self, local_tokens: int, k: int) -> int:
    """S: rows per destination block of the send buffer, for `local_tokens` tokens on one device."""
    rows = local_tokens * k
    if self.capacity_factor is None:
      return rows
    return (self.num_experts // self.mesh.shape[sharding.EXPERT]) * self.capacity(local_tokens, k)

  def capacity(self, local_tokens: int, k: int) -> int:
    return max(1, math.ceil(self.capacity_factor * local_tokens * k / self.num_experts))

  def __call__(self, experts: moe.RoutedExperts, x: jax.Array, weights: jax.Array, ids: jax.Array) -> jax.Array:
    mesh, e = self.mesh, self.num_experts
    n, h = x.shape
    k = ids.shape[-1]
    shards = math.prod(mesh.shape[a] for a in sharding.TOKEN_AXES)
    padded = -(-n // shards) * shards
    valid = jnp.arange(padded) < n
    pad = lambda a: jnp.pad(a, ((0, padded - n),) + ((0, 0),) * (a.ndim - 1))
    x_p, w_p, ids_p = pad(x), pad(weights), pad(ids)

    ep = mesh.shape[sharding.EXPERT]
    local_e = e // ep
    local_n = padded // shards
    capacity = None if self.capacity_factor is None else self.capacity(local_n, k)
    s = self.buffer_rows(local_n, k)
    impl = self.impl or moe.default_impl()
    graphdef, state = nnx.split(experts)

    def body(state, x, w, ids, valid):
      order, token_of_row, group_sizes = moe.sort_by_expert(ids, e)
      sorted_ids = ids.reshape(-1)[order]
      slot, rank = _send_slots(sorted_ids, group_sizes, ep, capacity)
      kept = (slot >= 0) & valid[token_of_row]
      dest = jnp.where(kept, (sorted_ids // local_e) * s + slot, ep * s)  # ep * s: a scratch row, cut off
      send_x = jnp.zeros((ep * s + 1, h), x.dtype).at[dest].set(x[token_of_row])[:-1]
      send_e = jnp.full((ep * s + 1,), local_e, jnp.int32).at[dest].set(sorted_ids % local_e)[:-1]
      recv_x = jax.lax.all_to_all(send_x, sharding.EXPERT, 0, 0, tiled=True)
      recv_e = jax.lax.all_to_all(send_e, sharding.EXPERT, 0, 0, tiled=True)
      local = nnx.merge(graphdef, state)
      out = _local_experts_ffn(local, recv_x, recv_e, local_e, local_n * k, impl)
      back = jax.lax.all_to_all(out, sharding.EXPERT, 0, 0, tiled=True)
      rows_out = jnp.concatenate([back, jnp.zeros((1, h), back.dtype)])[dest]
      y = moe.combine(rows_out, order, token_of_row, w, x.shape[0])
      dropped = jnp.sum(valid[token_of_row] & (slot < 0)).astype(jnp.int32)
      return y, jax.lax.psum(dropped, sharding.TOKEN_AXES)

    tokens = P(sharding.TOKEN_AXES)
    state_specs = jax.tree.map(lambda _: P(sharding.EXPERT), state)
    # check_vma=False: moe.grouped_ffn_segments starts its loop carry from an unvarying jnp.zeros, which the
    # varying-axes checker rejects; every output here is either token-sharded or an explicit psum.
    y, dropped = jax.shard_map(body, mesh=mesh, in_specs=(state_specs, tokens, tokens, tokens, tokens),
                               out_specs=(tokens, P()), check_vma=False)(state, x_p, w_p, ids_p, valid)
    if capacity is not None:
      self.dropped[...] = dropped
    return y[:n]


def moe_layers(model: nnx.Module) -> list[moe.MoE]:
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, moe.MoE)]


def enable_expert_parallel(model: nnx.Module, mesh: Mesh, *, capacity_factor: float | None = None,
                           impl: str | None = None) -> int:
  """Sets every MoE layer of `model` to dispatch over `mesh`; returns how many layers were set."""
  layers = moe_layers(model)
  for layer in layers:
    # MoE declares `dispatch` as a static attribute (None); a module holding variables must be marked data.
    layer.dispatch = nnx.data(ExpertParallelDispatch(mesh, layer.cfg.n_routed_experts,
                                                     capacity_factor=capacity_factor, impl=impl))
  return len(layers)


def disable_expert_parallel(model: nnx.Module) -> None:
  for layer in moe_layers(model):
    layer.dispatch = None


def dropped_assignments(model: nnx.Module) -> jax.Array:
  """Total (token, expert) assignments dropped by capacity in the last forward, over all MoE layers."""
  counts = [layer.dispatch.dropped[...] for layer in moe_layers(model)
            if isinstance(layer.dispatch, ExpertParallelDispatch)]
  return sum(counts, jnp.zeros((), jnp.int32))


def all_to_all_bytes(tokens: int, hidden: int, k: int, num_experts: int, expert_devices: int, total_devices: int,
                     itemsize: int, capacity_factor: float | None = None) -> dict[str, int]:
  """Bytes one device sends per MoE layer (forward, both all-to-alls) with this dispatch, and the useful part.

  `tokens` is the global token count, split evenly over `total_devices`. The buffer volume counts the whole
  dense send buffer (what XLA moves); `useful` counts only real rows leaving the device under uniform routing.
  """
  local = -(-tokens // total_devices)
  rows = local * k
  if capacity_factor is None:
    per_block = rows
  else:
    per_block = (num_experts // expert_devices) * max(1, math.ceil(capacity_factor * rows / num_experts))
  leaving = (expert_devices - 1) / expert_devices
  buffer = 2 * expert_devices * per_block * hidden * itemsize
  useful = 2 * rows * leaving * hidden * itemsize
  return {"buffer_bytes": int(buffer * leaving), "useful_bytes": int(useful), "send_buffer_rows": expert_devices * per_block}
