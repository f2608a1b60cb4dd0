"""Small building blocks shared by the encoder and the decoder.

Every parameter carries `logical_axes` metadata (names such as `embed`, `mlp`, `heads`, `expert`, `vocab`).
`dsocr_jax.sharding` maps those names to mesh axes; no module here knows a mesh axis.

Linear kernels are stored `[in, out]` (the checkpoint loader transposes PyTorch's `[out, in]`). A kernel may
also be held as FP8 (float8_e4m3fn) with a per-128x128-block scale; `Dense` then dequantises it at matmul time,
so the weights stay FP8 in memory.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]

default_init = nnx.initializers.normal(stddev=0.02)


def param(rngs: nnx.Rngs, init, shape: Sequence[int], dtype, axes: Axes) -> nnx.Param:
  """A parameter with its logical axes recorded as metadata."""
  assert len(axes) == len(shape), (shape, axes)
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), logical_axes=tuple(axes))


class FP8Scale(nnx.Variable):
  """Per-block dequantisation scale of an FP8 kernel (not trained)."""


def dequantize_blocks(q: jax.Array, scale: jax.Array, dtype, block: int = 128) -> jax.Array:
  """W[i, j] = float(q[i, j]) * scale[i // block, j // block] for a 2-D (or expert-stacked 3-D) kernel."""
  s = jnp.repeat(jnp.repeat(scale.astype(jnp.float32), block, axis=-2), block, axis=-1)
  s = s[..., :q.shape[-2], :q.shape[-1]]
  return (q.astype(jnp.float32) * s).astype(dtype)


def kernel_value(kernel: nnx.Param, scale: FP8Scale | None, dtype) -> jax.Array:
  """The kernel as a `dtype` array, dequantising FP8 storage on the fly."""
  w = kernel[...]
  if scale is not None:
    return dequantize_blocks(w, scale[...], dtype)
  return w.astype(dtype)


class Dense(nnx.Module):
  """y = x @ W (+ b), W stored [in, out]."""

  def __init__(self, in_features: int, out_features: int, *, axes: Axes, use_bias: bool = False,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    self.kernel = param(rngs, default_init, (in_features, out_features), param_dtype, axes)
    self.bias = param(rngs, nnx.initializers.zeros, (out_features,), param_dtype, axes[-1:]) if use_bias else None
    self.kernel_scale: FP8Scale | None = None

  def __call__(self, x: jax.Array) -> jax.Array:
    w = kernel_value(self.kernel, self.kernel_scale, self.dtype)
    y = jnp.dot(x.astype(self.dtype), w)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Embed(nnx.Module):
  def __init__(self, num: int, features: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    self.embedding = param(rngs, default_init, (num, features), param_dtype, ("vocab", "embed"))

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class RMSNorm(nnx.Module):
  """HF/DeepSeek RMSNorm: normalise in float32, cast back to the input dtype, then scale (spec 3)."""

  def __init__(self, features: int, *, eps: float, param_dtype=jnp.float32, rngs: nnx.Rngs):
    del rngs
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((features,), param_dtype), logical_axes=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * xf.astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, statistics in float32 (PyTorch semantics, biased variance)."""

  def __init__(self, features: int, *, eps: float, param_dtype=jnp.float32, rngs: nnx.Rngs):
    del rngs
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((features,), param_dtype), logical_axes=("norm",))
    self.bias = nnx.Param(jnp.zeros((features,), param_dtype), logical_axes=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


def swiglu(x: jax.Array, gate: Dense, up: Dense, down: Dense) -> jax.Array:
  """down(silu(gate(x)) * up(x)): DeepSeek's dense MLP and shared experts."""
  return down(jax.nn.silu(gate(x)) * up(x))


class SwiGLU(nnx.Module):
  """Dense SwiGLU MLP (layer 0 of the decoder, and the fused shared experts)."""

  def __init__(self, hidden: int, intermediate: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = Dense(hidden, intermediate, axes=("embed", "mlp"), **kw)
    self.up_proj = Dense(hidden, intermediate, axes=("embed", "mlp"), **kw)
    self.down_proj = Dense(intermediate, hidden, axes=("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return swiglu(x, self.gate_proj, self.up_proj, self.down_proj)
