"""PyTorch-exact resizing of position tables, as constant resize matrices (spec 2.1, 2.2, 6.6).

The official encoder resizes three learned tables to the token grid of the view it sees:
  * SAM `pos_embed` (64x64) and the CLIP position grid (16x16) with `F.interpolate(mode="bicubic",
    antialias=True, align_corners=False)`: PyTorch's separable antialiased kernel, Keys cubic with a = -0.5,
    support scaled by the downsampling factor, weights normalised to sum 1 per output sample (so edges are
    renormalised rather than clamped). It differs from the plain bicubic (a = -0.75) even when up-sampling,
    and from `jax.image.resize`.
  * the 127-entry rel-pos tables of SAM's global blocks with 1-D `linear`, align_corners=False, no antialias.

Each is a linear map along one axis, so we build its `[out, in]` matrix once per size pair in float64 numpy
(cached) and apply it to the parameter with an einsum inside the model: exact to float32 rounding,
differentiable, and free of per-call host work.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_CUBIC_A = -0.5  # PyTorch's antialiased bicubic uses Keys' a = -0.5 (the non-antialiased path uses -0.75)


def _keys_cubic(x: np.ndarray) -> np.ndarray:
  """PyTorch `HelperInterpCubic::aa_filter`: the Keys cubic convolution kernel with a = -0.5."""
  a, x = _CUBIC_A, np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.cache
def bicubic_aa_matrix(in_size: int, out_size: int) -> np.ndarray:
  """`[out, in]` weights of PyTorch's antialiased bicubic along one axis (`_compute_weights_aa`, CPU kernel).

  For output i: center = scale*(i + 0.5) with scale = in/out; support = 2*scale when down-sampling, else 2;
  taps j in [trunc(center - support + 0.5) clamped at 0, trunc(center + support + 0.5) clamped at in);
  weight = cubic((j - center + 0.5) / max(scale, 1)), normalised by the sum over the taps.
  """
  if in_size <= 0 or out_size <= 0:
    raise ValueError(f"resize: sizes must be positive, got {in_size} -> {out_size}")
  scale = in_size / out_size
  support = 2.0 * scale if scale >= 1.0 else 2.0
  invscale = 1.0 / scale if scale >= 1.0 else 1.0
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    taps = np.arange(lo, hi)
    w = _keys_cubic((taps - center + 0.5) * invscale)
    total = w.sum()
    m[i, lo:hi] = w / total if total != 0 else w
  m.setflags(write=False)
  return m


@functools.cache
def linear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """`[out, in]` weights of PyTorch's 1-D `linear` resize, align_corners=False, no antialias.

  src = max((i + 0.5) * in/out - 0.5, 0); taps floor(src) and min(floor(src) + 1, in - 1), lambda = frac(src).
  """
  if in_size <= 0 or out_size <= 0:
    raise ValueError(f"resize: sizes must be positive, got {in_size} -> {out_size}")
  scale = in_size / out_size
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    src = max((i + 0.5) * scale - 0.5, 0.0)
    i0 = min(int(src), in_size - 1)
    i1 = min(i0 + 1, in_size - 1)
    lam = src - i0
    m[i, i0] += 1.0 - lam
    m[i, i1] += lam
  m.setflags(write=False)
  return m


def resize_grid_bicubic_aa(table: jax.Array, out_h: int, out_w: int) -> jax.Array:
  """`[H, W, C]` -> `[out_h, out_w, C]` with PyTorch's antialiased bicubic; computed in float32 like the official
  code (which casts the table to float32 first), returned in the table's dtype. Identity sizes pass through."""
  h, w = table.shape[0], table.shape[1]
  if (h, w) == (out_h, out_w):
    return table
  mh = jnp.asarray(bicubic_aa_matrix(h, out_h), jnp.float32)
  mw = jnp.asarray(bicubic_aa_matrix(w, out_w), jnp.float32)
  out = jnp.einsum("oh,pw,hwc->opc", mh, mw, table.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return out.astype(table.dtype)


def resize_table_linear(table: jax.Array, out_len: int) -> jax.Array:
  """`[L, C]` -> `[out_len, C]` with PyTorch's 1-D linear resize (float32 like the official code)."""
  if table.shape[0] == out_len:
    return table
  m = jnp.asarray(linear_matrix(table.shape[0], out_len), jnp.float32)
  out = jnp.einsum("ol,lc->oc", m, table.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return out.astype(table.dtype)
