"""DeepSeek-V3-style FP8 weights (spec 9): float8_e4m3fn with one float32 scale per 128x128 block.

W[i, j] = float(W8[i, j]) * scale_inv[i // 128, j // 128]; despite its name the stored scale multiplies.
Partial edge blocks use the scale of their (zero-padded) block. UE8M0 scales (V3.1) are powers of two; they
are stored as float32 [spec marks this U: unverified], and we also accept a packed uint8 exponent form,
2^(u - 127).
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

BLOCK = 128
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E4M3_MAX = 448.0


def scale_shape(weight_shape: tuple[int, ...], block: int = BLOCK) -> tuple[int, ...]:
  return tuple(weight_shape[:-2]) + (math.ceil(weight_shape[-2] / block), math.ceil(weight_shape[-1] / block))


def decode_scales(scale: np.ndarray, name: str = "scale_inv", *, ue8m0: bool = False,
                  strict: bool = True) -> np.ndarray:
  """float32 scales from float storage or packed uint8 exponents; checks powers of two under UE8M0."""
  scale = np.asarray(scale)
  if scale.dtype == np.uint8:  # packed UE8M0 exponents; u = 255 would be NaN in the OCP E8M0 encoding
    if (scale == 255).any():
      raise ValueError(f"{name}: packed ue8m0 scale 255 is NaN")
    return np.ldexp(np.float32(1.0), scale.astype(np.int32) - 127).astype(np.float32)
  s = scale.astype(np.float32)
  if ue8m0 and strict:
    mantissa, _ = np.frexp(s)
    bad = ~((mantissa == 0.5) & (s > 0))
    if bad.any():
      idx = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(f"{name}: scale_fmt is ue8m0 but scale {float(s[idx])!r} at block {list(idx)} is not a "
                       f"power of two ({int(bad.sum())} such block(s)); pass --no-strict-scales to accept them")
  return s


def expand_scales(scale: np.ndarray, shape: tuple[int, ...], block: int = BLOCK) -> np.ndarray:
  s = np.repeat(np.repeat(scale, block, axis=-2), block, axis=-1)
  return s[..., :shape[-2], :shape[-1]]


def dequantize(w8: np.ndarray, scale: np.ndarray, block: int = BLOCK) -> np.ndarray:
  """float32 W from e4m3 storage and float32 block scales."""
  if tuple(scale.shape) != scale_shape(w8.shape, block):
    raise ValueError(f"fp8: scale shape {list(scale.shape)} does not match weight {list(w8.shape)} "
                     f"(expected {list(scale_shape(w8.shape, block))})")
  return np.asarray(w8).astype(np.float32) * expand_scales(scale.astype(np.float32), w8.shape, block)


def ceil_power_of_two(s: np.ndarray) -> np.ndarray:
  """2^ceil(log2 s) computed exactly (frexp, not a float log2 that can round 2^k + ulp down to k)."""
  mantissa, exponent = np.frexp(np.asarray(s, np.float32))
  return np.where(mantissa == 0.5, np.ldexp(np.float32(1.0), exponent - 1),
                  np.ldexp(np.float32(1.0), exponent)).astype(np.float32)


def encode_ue8m0(scale: np.ndarray) -> np.ndarray:
  """Packed uint8 exponents u with 2^(u - 127) == scale (scales must be powers of two in [2^-127, 2^128))."""
  s = decode_scales(scale, "scale", ue8m0=True)
  _, exponent = np.frexp(s)
  u = exponent.astype(np.int32) - 1 + 127
  if (u < 0).any() or (u > 255).any():
    raise ValueError("ue8m0: scale outside the 8-bit exponent range")
  return u.astype(np.uint8)


def quantize(w: np.ndarray, block: int = BLOCK, ue8m0: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """e4m3 weights and float32 block scales: s = amax/448 per block (rounded up to a power of two under UE8M0),
  q = round-to-nearest-even e4m3(w / s); an all-zero block gets s = 1. This is the rule of the golden FP8 set."""
  w = np.asarray(w, np.float32)
  rows, cols = w.shape[-2:]
  pr, pc = -rows % block, -cols % block
  padded = np.pad(w, [(0, 0)] * (w.ndim - 2) + [(0, pr), (0, pc)])
  blocks = padded.reshape(*w.shape[:-2], (rows + pr) // block, block, (cols + pc) // block, block)
  amax = np.abs(blocks).max(axis=(-3, -1))
  s = np.where(amax > 0, amax / np.float32(E4M3_MAX), 1.0).astype(np.float32)
  if ue8m0:
    s = ceil_power_of_two(s)
  q = (w / expand_scales(s, w.shape, block)).astype(E4M3)
  return q, s
