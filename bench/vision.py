"""Real-size DeepEncoder (SAM-B + CLIP-L + projector, random weights): JAX vs a PyTorch peer vs the FLOP floor.

  python bench/vision.py [--quick] [--reps 3] [--modes base,gundam] [--dtypes float32,bfloat16]

Workloads: one Base-mode image (one 1024 view) and one Gundam page with a 2x3 tile grid (a 1024 global view +
6 tiles of 640). The JAX side is the production path (`dsocr_jax.model.ocr.encode_image`: one jitted call per
view size, tiles batched). The peer is a plain-PyTorch encoder of the same architecture written after the
official modules (fused qkv, SDPA with the decomposed rel-pos bias as float mask, `F.interpolate` for the
position tables), loaded with the SAME random weights, so the run also reports the float32 disagreement.
Floor = matmul/conv FLOPs / the GEMM rate measured in this run. Runs are interleaved (A B A B, medians);
/proc/loadavg is logged. JSON line last: seconds per image, ratio_vs_torch (JAX / torch), ratio_vs_floor.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from dsocr_jax.config import ModelConfig, preset
from dsocr_jax.model import params
from dsocr_jax.model.ocr import DeepseekOCR, encode_image, encode_views_jit
from dsocr_jax.model.params import flatten

WORKLOADS = {"base": (1024, None, (1, 1)), "gundam": (1024, 640, (2, 3))}  # global size, tile size, (w, h)


def loadavg() -> list[str]:
  return open("/proc/loadavg").read().split()[:3]


# ------------------------------------------------------------------------------------------ FLOPs and floor


def view_gflop(cfg: ModelConfig, size: int) -> float:
  """Matmul + conv FLOPs of one view as our encoder computes it (padded windows included)."""
  s, c = cfg.sam, cfg.clip
  g, w = size // s.patch_size, s.window_size
  gp = -(-g // w) * w
  t, d = g * g, s.width
  f = 2 * t * 3 * s.patch_size ** 2 * d
  for b in range(s.depth):
    if b in s.global_attn_indexes:
      f += 2 * t * 4 * d * d + 4 * t * t * d + 4 * t * g * d
    else:
      nw = (gp // w) ** 2
      f += 2 * gp * gp * 4 * d * d + nw * (4 * (w * w) ** 2 * d + 4 * w * w * w * d)
    f += 2 * t * 2 * d * s.mlp_dim
  o, (d0, d1) = s.out_chans, s.downsample_channels
  f += 2 * t * d * o + 2 * t * o * o * 9 + 2 * (g // 2) ** 2 * o * d0 * 9 + 2 * (g // 4) ** 2 * d0 * d1 * 9
  tc = (g // 4) ** 2 + 1
  f += c.layers * (2 * tc * (4 * c.width ** 2 + 2 * c.width * c.ffn_hidden_size) + 4 * tc * tc * c.width)
  f += 2 * (tc - 1) * cfg.projector.input_dim * cfg.projector.n_embed
  return f / 1e9


def workload_gflop(cfg: ModelConfig, name: str) -> float:
  base, tile, (tw, th) = WORKLOADS[name]
  return view_gflop(cfg, base) + (tw * th * view_gflop(cfg, tile) if tile else 0.0)


def gemm_gflops(dtype, n: int = 2048, reps: int = 5) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best / 1e9


# ------------------------------------------------------------------------------------------------ the peer


def torch_rel_pos(size: int, table: torch.Tensor) -> torch.Tensor:
  """Official `get_rel_pos` for equal query/key sizes (linear resize to 2*size - 1 when needed)."""
  length = 2 * size - 1
  if table.shape[0] != length:
    table = F.interpolate(table.float().t()[None], size=length, mode="linear")[0].t().to(table.dtype)
  idx = torch.arange(size)[:, None] - torch.arange(size)[None, :] + size - 1
  return table[idx]


def torch_resize_grid(grid: torch.Tensor, size: int) -> torch.Tensor:
  """[h, w, C] -> [size, size, C] with the official antialiased bicubic (in float32)."""
  if grid.shape[0] == size:
    return grid
  x = grid.permute(2, 0, 1)[None].float()
  x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
  return x[0].permute(1, 2, 0).to(grid.dtype)


class TorchSamAttention(nn.Module):
  def __init__(self, dim, heads, rel_len):
    super().__init__()
    self.heads = heads
    self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
    self.rel_pos_h = nn.Parameter(torch.zeros(rel_len, dim // heads))
    self.rel_pos_w = nn.Parameter(torch.zeros(rel_len, dim // heads))

  def forward(self, x):
    b, h, w, c = x.shape
    q, k, v = self.qkv(x).reshape(b, h * w, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    r_q = q.reshape(b, self.heads, h, w, -1)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, torch_rel_pos(h, self.rel_pos_h))
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, torch_rel_pos(w, self.rel_pos_w))
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, self.heads, h * w, h * w)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return self.proj(out.transpose(1, 2).reshape(b, h, w, c))


class TorchSamBlock(nn.Module):
  def __init__(self, cfg, index):
    super().__init__()
    d = cfg.width
    self.window = 0 if index in cfg.global_attn_indexes else cfg.window_size
    self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
    self.attn = TorchSamAttention(d, cfg.heads, 2 * (self.window or cfg.pos_grid) - 1)
    self.lin1, self.lin2 = nn.Linear(d, cfg.mlp_dim), nn.Linear(cfg.mlp_dim, d)

  def forward(self, x):
    shortcut, x = x, self.norm1(x)
    if self.window:
      n, h, w, c = x.shape
      ws = self.window
      ph, pw = -h % ws, -w % ws
      x = F.pad(x, (0, 0, 0, pw, 0, ph))
      hp, wp = h + ph, w + pw
      x = x.view(n, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, c)
      x = self.attn(x)
      x = x.view(n, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(n, hp, wp, c)[:, :h, :w]
    else:
      x = self.attn(x)
    x = shortcut + x
    return x + self.lin2(F.gelu(self.lin1(self.norm2(x))))


def layer_norm_2d(x, norm):
  return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TorchEncoder(nn.Module):
  """SAM + CLIP + projector after the official modules; NHWC views in, projected tokens out."""

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    s, c = cfg.sam, cfg.clip
    self.patch_embed = nn.Conv2d(3, s.width, s.patch_size, s.patch_size)
    self.pos_embed = nn.Parameter(torch.zeros(1, s.pos_grid, s.pos_grid, s.width))
    self.blocks = nn.ModuleList([TorchSamBlock(s, i) for i in range(s.depth)])
    o, (d0, d1) = s.out_chans, s.downsample_channels
    self.neck_conv1, self.neck_conv2 = nn.Conv2d(s.width, o, 1, bias=False), nn.Conv2d(o, o, 3, padding=1, bias=False)
    self.neck_norm1, self.neck_norm2 = nn.LayerNorm(o, eps=1e-6), nn.LayerNorm(o, eps=1e-6)
    self.net_2 = nn.Conv2d(o, d0, 3, 2, 1, bias=False)
    self.net_3 = nn.Conv2d(d0, d1, 3, 2, 1, bias=False)
    self.class_embedding = nn.Parameter(torch.zeros(c.width))
    self.position_embedding = nn.Parameter(torch.zeros(c.pos_grid ** 2 + 1, c.width))
    self.pre_layrnorm = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
    self.clip_layers = nn.ModuleList([nn.ModuleDict(dict(
        layer_norm1=nn.LayerNorm(c.width, eps=c.layer_norm_eps), qkv_proj=nn.Linear(c.width, 3 * c.width),
        out_proj=nn.Linear(c.width, c.width), layer_norm2=nn.LayerNorm(c.width, eps=c.layer_norm_eps),
        fc1=nn.Linear(c.width, c.ffn_hidden_size), fc2=nn.Linear(c.ffn_hidden_size, c.width)))
        for _ in range(c.layers)])
    self.clip_heads = c.heads
    self.projector = nn.Linear(cfg.projector.input_dim, cfg.projector.n_embed)

  def sam(self, views):
    x = self.patch_embed(views.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    x = x + torch_resize_grid(self.pos_embed[0], x.shape[1])
    for block in self.blocks:
      x = block(x)
    x = x.permute(0, 3, 1, 2)
    x = layer_norm_2d(self.neck_conv2(layer_norm_2d(self.neck_conv1(x), self.neck_norm1)), self.neck_norm2)
    return self.net_3(self.net_2(x))  # NCHW

  def clip(self, sam):
    n, c, g, _ = sam.shape
    x = torch.cat([self.class_embedding.expand(n, 1, c), sam.flatten(2).transpose(1, 2)], dim=1)
    pos = self.position_embedding
    src = int(round((pos.shape[0] - 1) ** 0.5))
    pos = torch.cat([pos[:1], torch_resize_grid(pos[1:].reshape(src, src, c), g).reshape(g * g, c)])
    x = self.pre_layrnorm(x + pos)
    for layer in self.clip_layers:
      h = layer["layer_norm1"](x)
      q, k, v = layer["qkv_proj"](h).view(n, -1, 3, self.clip_heads, c // self.clip_heads).permute(2, 0, 3, 1, 4)
      attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, -1, c)
      x = x + layer["out_proj"](attn)
      h = layer["fc1"](layer["layer_norm2"](x))
      x = x + layer["fc2"](h * torch.sigmoid(1.702 * h))
    return x

  def forward(self, views):
    sam = self.sam(views)
    clip = self.clip(sam)
    return self.projector(torch.cat([clip[:, 1:], sam.flatten(2).transpose(1, 2)], dim=-1))


def torch_name(path: tuple) -> str:
  """Our parameter path -> the peer's parameter name (the peer fuses q/k/v; `fuse_qkv` handles those)."""
  top, rest = path[0], [str(p) for p in path[1:] if p not in ("mlp", "self_attn")]
  if top == "vision_model" and rest[0] == "layers":
    rest[0] = "clip_layers"
  if top == "projector":
    rest = ["projector"] + rest
  leaf = {"kernel": "weight", "scale": "weight"}.get(rest[-1], rest[-1])
  return ".".join(rest[:-1] + [leaf])


def load_torch(enc: TorchEncoder, tree: dict) -> None:
  """Copies our parameter tree (random weights) into the peer, undoing our layouts (strict: every name used)."""
  sd = {}
  for path, v in flatten(tree).items():
    if path[0] in ("decoder", "image_newline", "view_seperator"):
      continue
    v = np.asarray(v, np.float32)
    if path[-1] == "kernel":
      v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T  # HWIO -> OIHW, [in, out] -> [out, in]
    sd[torch_name(path)] = v
  for key in [k for k in sd if k.endswith((".q.weight", ".q.bias", ".q_proj.weight", ".q_proj.bias"))]:
    prefix, qname, leaf = key.rsplit(".", 2)
    parts = [sd.pop(f"{prefix}.{qname.replace('q', x, 1)}.{leaf}") for x in "qkv"]
    sd[f"{prefix}.{'qkv' if qname == 'q' else 'qkv_proj'}.{leaf}"] = np.concatenate(parts)  # rows [q | k | v]
  enc.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=True)


# ------------------------------------------------------------------------------------------------- driver


def random_tree(abstract: dict, seed: int = 0) -> dict:
  """Random float32 weights (std 0.02; norm scales 1) shaped like the model's parameters."""
  rng = np.random.default_rng(seed)

  def fill(path, x):
    if path[-1].key == "scale":
      return np.ones(x.shape, np.float32)
    return (rng.standard_normal(x.shape, np.float32) * 0.02).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def encoder_config(name: str = "deepseek-ocr") -> ModelConfig:
  """The preset's encoder with a one-layer, tiny-vocabulary decoder (the bench never runs the decoder)."""
  cfg = preset(name)
  dec = dataclasses.replace(cfg.decoder, vocab_size=16, num_hidden_layers=1, intermediate_size=16)
  return dataclasses.replace(cfg, decoder=dec)


@dataclasses.dataclass
class Page:
  global_view: np.ndarray
  tiles: np.ndarray | None
  crop: tuple[int, int]


def make_page(name: str, rng) -> Page:
  base, tile, (tw, th) = WORKLOADS[name]
  g = rng.uniform(-1, 1, (base, base, 3)).astype(np.float32)
  tiles = rng.uniform(-1, 1, (tw * th, tile, tile, 3)).astype(np.float32) if tile else None
  return Page(g, tiles, (tw, th))


def run_jax(model, page: Page):
  feats, _, _ = encode_image(model, page.global_view, page.tiles, page.crop)
  return feats.block_until_ready()


def run_torch(enc, page: Page, dtype):
  with torch.inference_mode():
    outs = [enc(torch.from_numpy(page.global_view)[None].to(dtype))]
    if page.tiles is not None:
      outs.append(enc(torch.from_numpy(page.tiles).to(dtype)))
  return outs


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--modes", default="base,gundam")
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--torch-bf16-modes", default="base,gundam",
                  help="torch bf16 runs ~5x slower than f32 on this CPU; limit where it is measured")
  ap.add_argument("--preset", default="deepseek-ocr", help="`tiny` checks the script itself in seconds")
  ap.add_argument("--quick", action="store_true", help="2 reps; torch bf16 on the Base image only, once")
  args = ap.parse_args()
  modes, dtypes = args.modes.split(","), args.dtypes.split(",")
  torch_bf16_modes = {"base"} if args.quick else set(args.torch_bf16_modes.split(","))
  reps = 2 if args.quick else args.reps
  print(f"loadavg start {loadavg()}; torch threads {torch.get_num_threads()}; jax devices {jax.devices()}")

  cfg = encoder_config(args.preset)
  ctor = lambda dt: (lambda: DeepseekOCR(cfg, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0)))
  tree = random_tree(nnx.to_pure_dict(nnx.state(nnx.eval_shape(ctor(jnp.float32)), nnx.Param)))
  models = {dt: params.from_tree(ctor(jnp.dtype(dt)), tree, dtype=jnp.dtype(dt)) for dt in dtypes}
  peer = TorchEncoder(cfg).eval()
  load_torch(peer, tree)
  del tree
  peers = {"float32": peer}
  if "bfloat16" in dtypes:
    peers["bfloat16"] = TorchEncoder(cfg).eval()
    peers["bfloat16"].load_state_dict(peer.state_dict())
    peers["bfloat16"].to(torch.bfloat16)
  tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}

  rng = np.random.default_rng(0)
  pages = {m: make_page(m, rng) for m in modes}
  rates = {dt: gemm_gflops(jnp.dtype(dt)) for dt in dtypes}
  print(f"GEMM rate (JAX, 2048^3): " + ", ".join(f"{dt} {r:.0f} GFLOP/s" for dt, r in rates.items()))

  # Warm-up: compile each (view size, dtype) once; check the peer agrees in float32 on the Base image.
  agreement = None
  for m in modes:
    for dt in dtypes:
      t0 = time.perf_counter()
      out = run_jax(models[dt], pages[m])
      print(f"compile+first {m} {dt}: {time.perf_counter() - t0:.1f}s")
      del out
      if dt == "float32" and m == modes[0]:
        ref = run_torch(peers["float32"], pages[m], torch.float32)[0].numpy()
        ours = np.asarray(encode_views_jit(models[dt], pages[m].global_view[None]).proj)
        agreement = float(np.abs(ours - ref).max() / max(1.0, np.abs(ref).max()))
        print(f"float32 agreement with the torch peer ({m} global view): max rel err {agreement:.2e}")

  times: dict[tuple[str, str, str], list[float]] = {}
  for rep in range(reps):
    for m in modes:
      for dt in dtypes:
        impls = [("jax", lambda: run_jax(models[dt], pages[m]))]
        if dt == "float32" or (m in torch_bf16_modes and (rep == 0 or not args.quick)):
          impls.append(("torch", lambda: run_torch(peers[dt], pages[m], tdt[dt])))
        for impl, fn in impls:
          t0 = time.perf_counter()
          fn()
          dt_s = time.perf_counter() - t0
          times.setdefault((m, dt, impl), []).append(dt_s)
          print(f"rep {rep} {m:7s} {dt:9s} {impl:5s} {dt_s:8.2f}s  loadavg {loadavg()}", flush=True)

  results = {}
  for m in modes:
    gflop = workload_gflop(cfg, m)
    r = {"gflop": round(gflop, 1)}
    for dt in dtypes:
      floor = gflop / rates[dt]
      j = statistics.median(times[(m, dt, "jax")])
      t = statistics.median(times[(m, dt, "torch")]) if (m, dt, "torch") in times else None
      r[dt] = dict(jax_s=round(j, 3), torch_s=None if t is None else round(t, 3),
                   floor_s=round(floor, 3), ratio_vs_torch=None if t is None else round(j / t, 3),
                   ratio_vs_floor=round(j / floor, 3), runs_jax=len(times[(m, dt, "jax")]),
                   runs_torch=len(times.get((m, dt, "torch"), [])))
    results["gundam_2x3" if m == "gundam" else m] = r
  print(json.dumps(dict(bench="vision_encoder", model=f"{args.preset} (random weights)", reps=reps,
                        gemm_gflops={dt: round(r, 1) for dt, r in rates.items()},
                        f32_rel_err_vs_torch=agreement, results=results, loadavg_end=loadavg())))


if __name__ == "__main__":
  main()
