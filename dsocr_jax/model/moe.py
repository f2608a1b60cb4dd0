"""DeepSeek-V2 MoE layer as dispatch: route -> group tokens by expert -> grouped matmul -> combine (spec 3).

Routing follows the hub `MoEGate`: float32 router logits over all experts, softmax, greedy top-k, the raw
(unnormalised) probabilities times `routed_scaling_factor` as weights. Output = sum_k w_k * expert_k(x) +
shared_experts(x).

The grouped matmul has two implementations of the same maths:
* `ragged_dot` (accelerators): `jax.lax.ragged_dot` over the expert-sorted tokens;
* a segment loop (CPU): XLA-CPU lowers `ragged_dot` to a dense product over every expert (measured ~90x slower
  than the FLOP floor at real size), so on CPU we loop over experts and, inside each, over fixed-size chunks of
  its contiguous rows. An expert that received no token costs nothing: its weights are not even read.
`dsocr_jax.sharding` wraps these same steps in `shard_map` for expert parallelism.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dsocr_jax.config import DecoderConfig
from dsocr_jax.model.layers import Dense, FP8Scale, SwiGLU, dequantize_blocks, default_init, param


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RouterInfo:
  """What the router decided, per token: for the aux loss, metrics and the golden routing checks."""
  probs: jax.Array    # [B, T, E] float32 softmax over all experts
  topk_ids: jax.Array  # [B, T, k] int32, by descending probability
  topk_weights: jax.Array  # [B, T, k] float32


def route(x: jax.Array, gate_kernel: jax.Array, k: int, scaling: float, norm_topk: bool):
  """x `[N, H]` -> (weights [N,k] f32, ids [N,k] int32, probs [N,E] f32)."""
  logits = jnp.dot(x.astype(jnp.float32), gate_kernel.astype(jnp.float32))
  probs = jax.nn.softmax(logits, axis=-1)
  weights, ids = jax.lax.top_k(probs, k)
  if norm_topk and k > 1:
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
  return weights * scaling, ids.astype(jnp.int32), probs


def sort_by_expert(ids: jax.Array, num_experts: int):
  """Flattened assignments sorted by expert: (order [N*k], token index of each sorted row, group sizes [E])."""
  flat = ids.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  token_of_row = order // ids.shape[-1]
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  return order, token_of_row, group_sizes


def combine(rows_out: jax.Array, order: jax.Array, token_of_row: jax.Array, weights: jax.Array,
            num_tokens: int) -> jax.Array:
  """sum_k w_k * out_k per token, in float32 (as the hub's moe_infer), returned as float32 [N, H]."""
  w_sorted = weights.reshape(-1)[order]
  contrib = rows_out.astype(jnp.float32) * w_sorted[:, None]
  return jnp.zeros((num_tokens, rows_out.shape[-1]), jnp.float32).at[token_of_row].add(contrib)


ExpertWeights = tuple[jax.Array, jax.Array, jax.Array]  # gate [E,H,I], up [E,H,I], down [E,I,H]
WeightFn = Callable[[jax.Array], ExpertWeights]  # expert index (traced) -> that expert's three matrices


def _ffn(x, wg, wu, wd):
  return jnp.dot(jax.nn.silu(jnp.dot(x, wg)) * jnp.dot(x, wu), wd)


def grouped_ffn_ragged(x: jax.Array, group_sizes: jax.Array, weights: ExpertWeights) -> jax.Array:
  wg, wu, wd = weights
  h = jax.lax.ragged_dot(x, wg, group_sizes)
  u = jax.lax.ragged_dot(x, wu, group_sizes)
  return jax.lax.ragged_dot(jax.nn.silu(h) * u, wd, group_sizes)


def chunk_size_for(rows: int, num_experts: int) -> int:
  """Rows per chunk for the segment loop: about the mean group size, a power of two in [8, 256]."""
  mean = max(1, -(-rows // num_experts))
  return int(min(256, max(8, 1 << (mean - 1).bit_length())))


def grouped_ffn_segments(x: jax.Array, group_sizes: jax.Array, expert_weights: WeightFn, num_experts: int,
                         chunk: int | None = None) -> jax.Array:
  """Rows of x are grouped by expert (contiguous, in expert order); applies each expert to its rows.

  The work is a static-length schedule of tiles (expert e, `chunk` rows starting inside e's group). The real
  tiles number sum_e ceil(size_e / chunk) <= floor(M / chunk) + min(E, M) (one partial tile per non-empty
  expert at most), a static bound; schedule slots past the real tiles are
  skipped by `lax.cond`, so an idle expert costs neither FLOPs nor a read of its weights. Being a `scan` of
  fixed length, it is reverse-differentiable (training) and usable inside `shard_map`.
  """
  m, h = x.shape
  chunk = chunk or chunk_size_for(m, num_experts)
  offsets = jnp.cumsum(group_sizes) - group_sizes
  tiles_per_expert = (group_sizes + chunk - 1) // chunk
  tile_end = jnp.cumsum(tiles_per_expert)
  num_tiles = m // chunk + min(num_experts, m)  # static upper bound on the real tiles (see above)
  tile_ids = jnp.arange(num_tiles, dtype=tile_end.dtype)
  tile_expert = jnp.minimum(jnp.searchsorted(tile_end, tile_ids, side="right"), num_experts - 1)
  tile_index = tile_ids - (tile_end - tiles_per_expert)[tile_expert]  # which chunk of its expert's group
  xp = jnp.pad(x, ((0, chunk), (0, 0)))  # slices near the end never clamp (which would shift rows)

  def step(out, tile):
    t, e, c = tile
    s = offsets[e] + c * chunk
    rows = jax.lax.dynamic_slice_in_dim(xp, s, chunk)
    valid = (c * chunk + jnp.arange(chunk)) < group_sizes[e]

    def compute(out):
      y = _ffn(rows, *expert_weights(e)).astype(out.dtype)
      prev = jax.lax.dynamic_slice_in_dim(out, s, chunk)
      return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(valid[:, None], y, prev), s, axis=0)

    return jax.lax.cond(t < tile_end[-1], compute, lambda out: out, out), None

  out, _ = jax.lax.scan(step, jnp.zeros_like(xp), (tile_ids, tile_expert, tile_index))
  return out[:m]


def default_impl() -> str:
  return "segments" if jax.default_backend() == "cpu" else "ragged"


class RoutedExperts(nnx.Module):
  """The routed experts' SwiGLU weights stacked as `[E, ...]`."""

  def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    e, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    self.dtype = dtype
    self.num_experts = e
    self.gate_proj = param(rngs, default_init, (e, h, i), param_dtype, ("expert", "embed", "moe_mlp"))
    self.up_proj = param(rngs, default_init, (e, h, i), param_dtype, ("expert", "embed", "moe_mlp"))
    self.down_proj = param(rngs, default_init, (e, i, h), param_dtype, ("expert", "moe_mlp", "embed"))
    # Set by the FP8 loader: per-block scales [E, ceil(rows/128), ceil(cols/128)] of FP8-stored weights.
    self.gate_proj_scale: FP8Scale | None = None
    self.up_proj_scale: FP8Scale | None = None
    self.down_proj_scale: FP8Scale | None = None

  def _one(self, w: nnx.Param, scale: FP8Scale | None, e) -> jax.Array:
    if scale is None:
      return w[e].astype(self.dtype)
    return dequantize_blocks(w[e], scale[e], self.dtype)

  def expert(self, e) -> ExpertWeights:
    return (self._one(self.gate_proj, self.gate_proj_scale, e), self._one(self.up_proj, self.up_proj_scale, e),
            self._one(self.down_proj, self.down_proj_scale, e))

  def stacked(self) -> ExpertWeights:
    return self.expert(slice(None))

  def __call__(self, x_sorted: jax.Array, group_sizes: jax.Array, impl: str | None = None) -> jax.Array:
    impl = impl or default_impl()
    if impl == "ragged":
      return grouped_ffn_ragged(x_sorted.astype(self.dtype), group_sizes, self.stacked())
    if impl == "segments":
      return grouped_ffn_segments(x_sorted.astype(self.dtype), group_sizes, self.expert, self.num_experts)
    raise ValueError(f"moe impl: unknown implementation {impl!r} (expected 'ragged' or 'segments')")


class MoE(nnx.Module):

  def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    # The router stays float32-computed whatever the storage dtype (hub MoEGate casts to fp32).
    self.gate = Dense(cfg.hidden_size, cfg.n_routed_experts, axes=("embed", None), dtype=jnp.float32,
                      param_dtype=param_dtype, rngs=rngs)
    self.experts = RoutedExperts(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.shared_experts = (SwiGLU(cfg.hidden_size, cfg.shared_intermediate_size, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs) if cfg.n_shared_experts else None)
    # Replaced by dsocr_jax.sharding.expert_parallel(...) to run the routed experts over a mesh.
    self.dispatch: Callable | None = None

  def __call__(self, x: jax.Array) -> tuple[jax.Array, RouterInfo]:
    b, t, h = x.shape
    cfg = self.cfg
    flat = x.reshape(b * t, h)
    weights, ids, probs = route(flat, self.gate.kernel[...], cfg.num_experts_per_tok, cfg.routed_scaling_factor,
                                cfg.norm_topk_prob)
    if self.dispatch is not None:
      y = self.dispatch(self.experts, flat, weights, ids)
    else:
      order, token_of_row, group_sizes = sort_by_expert(ids, cfg.n_routed_experts)
      rows_out = self.experts(flat[token_of_row], group_sizes)
      y = combine(rows_out, order, token_of_row, weights, b * t)
    y = y.astype(x.dtype)
    if self.shared_experts is not None:
      y = y + self.shared_experts(x).reshape(b * t, h)
    info = RouterInfo(probs.reshape(b, t, -1), ids.reshape(b, t, -1), weights.reshape(b, t, -1))
    return y.reshape(b, t, h), info


def load_balancing_loss(info: RouterInfo, mask: jax.Array, num_experts: int) -> jax.Array:
  """DeepSeek-V2 sequence-level auxiliary loss (before `aux_loss_alpha`), padding excluded.

  Per sequence: f_e = (count of e in the top-k) / (T_valid * k / E), P_e = mean_t probs_e; loss = sum_e f_e P_e,
  averaged over sequences (hub MoEGate with seq_aux=True).
  """
  k = info.topk_ids.shape[-1]
  m = mask.astype(jnp.float32)
  n_valid = jnp.maximum(jnp.sum(m, axis=1), 1.0)  # [B]
  counts = jnp.sum(jax.nn.one_hot(info.topk_ids, num_experts, dtype=jnp.float32) * m[..., None, None], axis=(1, 2))
  f = counts / (n_valid[:, None] * k / num_experts)
  p = jnp.sum(info.probs * m[..., None], axis=1) / n_valid[:, None]
  return jnp.mean(jnp.sum(f * p, axis=-1))
