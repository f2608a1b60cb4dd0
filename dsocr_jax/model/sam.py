"""SAM-ViT-B image encoder with the DeepSeek-OCR neck and 16x compressor (spec 2.1).

Channels-last throughout: a view `[n, S, S, 3]` becomes `[n, S/16, S/16, width]` patches, goes through windowed
(14x14) and global attention blocks with decomposed relative positions, then the neck (1x1 conv, LayerNorm2d,
3x3 conv, LayerNorm2d) and two stride-2 3x3 convs: `[n, S/64, S/64, output_channels]` (the official NCHW map,
transposed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsocr_jax.config import SamConfig
from dsocr_jax.model.layers import Dense, LayerNorm, default_init, param
from dsocr_jax.model.resize import resize_grid_bicubic_aa, resize_table_linear


def split_heads(x: jax.Array, heads: int) -> jax.Array:
  """`[..., heads*head_dim]` -> `[..., heads, head_dim]` (head-major channels, as the official reshapes)."""
  return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


def vit_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None) -> jax.Array:
  """Non-causal softmax(q k^T / sqrt(d) + bias) v (PyTorch SDPA with an additive float mask).

  q/k/v `[B, T, heads, d]`, bias `[B, heads, T, T]`; logits and softmax in float32.
  """
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bnqk,bknd->bqnd", probs, v)


def conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """NHWC x HWIO convolution with symmetric zero padding (PyTorch `Conv2d(padding=p, stride=s)`)."""
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Conv(nnx.Module):
  """A square conv with an HWIO kernel (the loader turns PyTorch's OIHW into HWIO)."""

  def __init__(self, in_ch: int, out_ch: int, size: int, *, stride: int = 1, padding: int = 0,
               use_bias: bool = False, dtype, param_dtype, rngs: nnx.Rngs):
    self.dtype, self.stride, self.padding = dtype, stride, padding
    self.kernel = param(rngs, default_init, (size, size, in_ch, out_ch), param_dtype,
                        ("kernel_h", "kernel_w", "conv_in", "conv_out"))
    self.bias = param(rngs, nnx.initializers.zeros, (out_ch,), param_dtype, ("conv_out",)) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.kernel[...].astype(self.dtype)
    x = x.astype(self.dtype)
    kh = w.shape[0]
    if self.padding == 0 and self.stride == kh and x.shape[1] % kh == 0 and x.shape[2] % kh == 0:
      # Non-overlapping patches (the patch embedding): a reshape and one matmul, the same sums as the conv.
      n, h, wd, c = x.shape
      patches = x.reshape(n, h // kh, kh, wd // kh, kh, c).transpose(0, 1, 3, 2, 4, 5)
      y = jnp.dot(patches.reshape(n, h // kh, wd // kh, kh * kh * c), w.reshape(kh * kh * c, -1))
    else:
      y = conv2d(x, w, self.stride, self.padding)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def rel_pos_rows(table: jax.Array, size: int) -> jax.Array:
  """`get_rel_pos` for equal query/key sides: R[i, j] = table'[i - j + size - 1], `[size, size, head_dim]`.

  table' is the table linearly resized to 2*size - 1 entries when its length differs (global blocks on a
  grid other than the trained 64).
  """
  table = resize_table_linear(table, 2 * size - 1)
  idx = np.arange(size)[:, None] - np.arange(size)[None, :] + size - 1
  return table[idx]


class SamAttention(nnx.Module):

  def __init__(self, cfg: SamConfig, rel_len: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    c = cfg.width
    self.heads = cfg.heads
    self.q = Dense(c, c, axes=("embed", "heads"), **kw)
    self.k = Dense(c, c, axes=("embed", "heads"), **kw)
    self.v = Dense(c, c, axes=("embed", "heads"), **kw)
    self.proj = Dense(c, c, axes=("heads", "embed"), **kw)
    self.rel_pos_h = param(rngs, nnx.initializers.zeros, (rel_len, cfg.head_dim), param_dtype,
                           ("rel_pos", "head_dim"))
    self.rel_pos_w = param(rngs, nnx.initializers.zeros, (rel_len, cfg.head_dim), param_dtype,
                           ("rel_pos", "head_dim"))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x `[B, h, w, C]` (a batch of windows or whole grids): attention over the h*w tokens of each item."""
    b, h, w, c = x.shape
    q, k, v = (split_heads(proj(x), self.heads) for proj in (self.q, self.k, self.v))  # [B, h, w, n, d]
    # Decomposed relative positions, built from the UNSCALED q (official `add_decomposed_rel_pos`).
    rh = rel_pos_rows(self.rel_pos_h[...], h).astype(q.dtype)
    rw = rel_pos_rows(self.rel_pos_w[...], w).astype(q.dtype)
    rel_h = jnp.einsum("byxnd,ykd->bnyxk", q, rh, preferred_element_type=jnp.float32)
    rel_w = jnp.einsum("byxnd,xkd->bnyxk", q, rw, preferred_element_type=jnp.float32)
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, self.heads, h * w, h * w)
    flat = lambda t: t.reshape(b, h * w, self.heads, -1)
    out = vit_attention(flat(q), flat(k), flat(v), bias)
    return self.proj(out.reshape(b, h, w, c))


class SamMLP(nnx.Module):

  def __init__(self, cfg: SamConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.lin1 = Dense(cfg.width, cfg.mlp_dim, axes=("embed", "mlp"), **kw)
    self.lin2 = Dense(cfg.mlp_dim, cfg.width, axes=("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.lin2(jax.nn.gelu(self.lin1(x), approximate=False))


def window_partition(x: jax.Array, ws: int) -> tuple[jax.Array, tuple[int, int]]:
  """`[n, H, W, C]` -> `[n * nh * nw, ws, ws, C]` windows in row-major order, zero-padding bottom/right first."""
  n, h, w, c = x.shape
  ph, pw = -h % ws, -w % ws
  x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  hp, wp = h + ph, w + pw
  x = x.reshape(n, hp // ws, ws, wp // ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, ws, ws, c), (hp, wp)


def window_unpartition(windows: jax.Array, ws: int, padded: tuple[int, int], size: tuple[int, int]) -> jax.Array:
  """Inverse of `window_partition`, cropping the padding away."""
  hp, wp = padded
  c = windows.shape[-1]
  x = windows.reshape(-1, hp // ws, wp // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(-1, hp, wp, c)
  return x[:, :size[0], :size[1]]


class SamBlock(nnx.Module):

  def __init__(self, cfg: SamConfig, index: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.window_size = 0 if index in cfg.global_attn_indexes else cfg.window_size
    rel_len = 2 * (self.window_size or cfg.pos_grid) - 1
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = LayerNorm(cfg.width, eps=cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.attn = SamAttention(cfg, rel_len, **kw)
    self.norm2 = LayerNorm(cfg.width, eps=cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.mlp = SamMLP(cfg, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.norm1(x)
    if self.window_size:
      # Padding comes after norm1, so padded tokens are zeros that still get the qkv bias (spec 2.1).
      windows, padded = window_partition(h, self.window_size)
      h = window_unpartition(self.attn(windows), self.window_size, padded, x.shape[1:3])
    else:
      h = self.attn(h)
    x = x + h
    return x + self.mlp(self.norm2(x))


class SamEncoder(nnx.Module):
  """`model.sam_model`: views `[n, S, S, 3]` -> `[n, S/64, S/64, output_channels]`."""

  def __init__(self, cfg: SamConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg, self.dtype = cfg, dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.patch_embed = Conv(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, use_bias=True, **kw)
    self.pos_embed = param(rngs, nnx.initializers.zeros, (1, cfg.pos_grid, cfg.pos_grid, cfg.width), param_dtype,
                           (None, "pos", "pos", "embed"))
    self.blocks = nnx.List([SamBlock(cfg, i, **kw) for i in range(cfg.depth)])
    o, (d0, d1) = cfg.out_chans, cfg.downsample_channels
    norm = lambda: LayerNorm(o, eps=cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.neck_conv1 = Conv(cfg.width, o, 1, **kw)
    self.neck_norm1 = norm()
    self.neck_conv2 = Conv(o, o, 3, padding=1, **kw)
    self.neck_norm2 = norm()
    self.net_2 = Conv(o, d0, 3, stride=2, padding=1, **kw)
    self.net_3 = Conv(d0, d1, 3, stride=2, padding=1, **kw)

  def pos_embed_for(self, grid: int) -> jax.Array:
    """The absolute position table for a `grid x grid` patch grid `[grid, grid, width]` (resized when != 64)."""
    return resize_grid_bicubic_aa(self.pos_embed[...][0], grid, grid)

  def __call__(self, views: jax.Array) -> jax.Array:
    x = self.patch_embed(views)
    if x.shape[1] != x.shape[2]:
      raise ValueError(f"views: SAM needs square views, got {views.shape[1]}x{views.shape[2]}")
    x = x + self.pos_embed_for(x.shape[1]).astype(self.dtype)
    for block in self.blocks:
      x = block(x)
    x = self.neck_norm1(self.neck_conv1(x))
    x = self.neck_norm2(self.neck_conv2(x))
    return self.net_3(self.net_2(x))
