"""The manifest: every tensor of the released checkpoint layout, its shape, and where it goes in our tree.

Spec section 6. One `Entry` per parameter of our tree; an entry names its source tensor(s) with the shape the
config implies, and how to transform them: transpose `Linear` weights `[out, in] -> [in, out]`, convs
`OIHW -> HWIO`, split the fused qkv rows `[q | k | v]`, stack the routed experts into `[E, ...]`. The source
names keep the format's typos (`pre_layrnorm`, `view_seperator`). Loader, converter and validation all read
this one list.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dsocr_jax.config import ModelConfig

Path = tuple[str | int, ...]

# In the released layout but unused by the model (CLIP's patch conv is replaced by SAM features; position_ids is
# a buffer). Accepted when present, never required.
OPTIONAL_UNUSED = ("model.vision_model.embeddings.patch_embedding.weight",
                   "model.vision_model.embeddings.position_ids")


@dataclasses.dataclass(frozen=True)
class Entry:
  dst: Path
  sources: tuple[str, ...]
  src_shape: tuple[int, ...]  # the shape of each source tensor
  op: str = "copy"  # copy | T | conv | split0T/split1T/split2T | split0/split1/split2 | stackT

  @property
  def dst_shape(self) -> tuple[int, ...]:
    s = self.src_shape
    if self.op == "T":
      return s[::-1]
    if self.op == "conv":
      return (s[2], s[3], s[1], s[0])
    if self.op.startswith("split") and self.op.endswith("T"):
      return (s[1], s[0] // 3)
    if self.op.startswith("split"):
      return (s[0] // 3,)
    if self.op == "stackT":
      return (len(self.sources), s[1], s[0])
    return s

  def apply(self, arrays: list[np.ndarray]) -> np.ndarray:
    a = arrays[0]
    if self.op == "copy":
      return a
    if self.op == "T":
      return a.T
    if self.op == "conv":
      return a.transpose(2, 3, 1, 0)
    if self.op.startswith("split"):
      i, n = int(self.op[5]), a.shape[0] // 3
      part = a[i * n:(i + 1) * n]
      return part.T if self.op.endswith("T") else part
    if self.op == "stackT":
      return np.stack([x.T for x in arrays])
    raise AssertionError(self.op)


def _linear(dst: Path, src: str, out_f: int, in_f: int, bias: bool = True) -> list[Entry]:
  e = [Entry(dst + ("kernel",), (src + ".weight",), (out_f, in_f), "T")]
  if bias:
    e.append(Entry(dst + ("bias",), (src + ".bias",), (out_f,)))
  return e


def _norm(dst: Path, src: str, n: int, bias: bool = True) -> list[Entry]:
  e = [Entry(dst + ("scale",), (src + ".weight",), (n,))]
  if bias:
    e.append(Entry(dst + ("bias",), (src + ".bias",), (n,)))
  return e


def _fused_qkv(dst: Path, src: str, dim: int, names=("q", "k", "v")) -> list[Entry]:
  out = []
  for i, name in enumerate(names):
    out.append(Entry(dst + (name, "kernel"), (src + ".weight",), (3 * dim, dim), f"split{i}T"))
    out.append(Entry(dst + (name, "bias"), (src + ".bias",), (3 * dim,), f"split{i}"))
  return out


def sam_entries(cfg: ModelConfig) -> list[Entry]:
  s = cfg.sam
  p, c, d = "model.sam_model.", s.width, ("sam_model",)
  e = [Entry(d + ("patch_embed", "kernel"), (p + "patch_embed.proj.weight",), (c, 3, s.patch_size, s.patch_size),
             "conv"),
       Entry(d + ("patch_embed", "bias"), (p + "patch_embed.proj.bias",), (c,)),
       Entry(d + ("pos_embed",), (p + "pos_embed",), (1, s.pos_grid, s.pos_grid, c))]
  for b in range(s.depth):
    src, dst = f"{p}blocks.{b}.", d + ("blocks", b)
    rel = 2 * (s.pos_grid if b in s.global_attn_indexes else s.window_size) - 1
    e += _norm(dst + ("norm1",), src + "norm1", c) + _norm(dst + ("norm2",), src + "norm2", c)
    e += _fused_qkv(dst + ("attn",), src + "attn.qkv", c)
    e += _linear(dst + ("attn", "proj"), src + "attn.proj", c, c)
    e += [Entry(dst + ("attn", "rel_pos_h"), (src + "attn.rel_pos_h",), (rel, s.head_dim)),
          Entry(dst + ("attn", "rel_pos_w"), (src + "attn.rel_pos_w",), (rel, s.head_dim))]
    e += _linear(dst + ("mlp", "lin1"), src + "mlp.lin1", s.mlp_dim, c)
    e += _linear(dst + ("mlp", "lin2"), src + "mlp.lin2", c, s.mlp_dim)
  o, (d0, d1) = s.out_chans, s.downsample_channels
  e += [Entry(d + ("neck_conv1", "kernel"), (p + "neck.0.weight",), (o, c, 1, 1), "conv")]
  e += _norm(d + ("neck_norm1",), p + "neck.1", o)
  e += [Entry(d + ("neck_conv2", "kernel"), (p + "neck.2.weight",), (o, o, 3, 3), "conv")]
  e += _norm(d + ("neck_norm2",), p + "neck.3", o)
  e += [Entry(d + ("net_2", "kernel"), (p + "net_2.weight",), (d0, o, 3, 3), "conv"),
        Entry(d + ("net_3", "kernel"), (p + "net_3.weight",), (d1, d0, 3, 3), "conv")]
  return e


def clip_entries(cfg: ModelConfig) -> list[Entry]:
  cl = cfg.clip
  p, c, d = "model.vision_model.", cl.width, ("vision_model",)
  e = [Entry(d + ("class_embedding",), (p + "embeddings.class_embedding",), (c,)),
       Entry(d + ("position_embedding",), (p + "embeddings.position_embedding.weight",), (cl.pos_grid ** 2 + 1, c))]
  e += _norm(d + ("pre_layrnorm",), p + "pre_layrnorm", c)
  for i in range(cl.layers):
    src, dst = f"{p}transformer.layers.{i}.", d + ("layers", i)
    e += _norm(dst + ("layer_norm1",), src + "layer_norm1", c) + _norm(dst + ("layer_norm2",), src + "layer_norm2", c)
    e += _fused_qkv(dst + ("self_attn",), src + "self_attn.qkv_proj", c, ("q_proj", "k_proj", "v_proj"))
    e += _linear(dst + ("self_attn", "out_proj"), src + "self_attn.out_proj", c, c)
    e += _linear(dst + ("mlp", "fc1"), src + "mlp.fc1", cl.ffn_hidden_size, c)
    e += _linear(dst + ("mlp", "fc2"), src + "mlp.fc2", c, cl.ffn_hidden_size)
  return e


def projector_entries(cfg: ModelConfig) -> list[Entry]:
  pr = cfg.projector
  return (_linear(("projector",), "model.projector.layers", pr.n_embed, pr.input_dim)
          + [Entry(("image_newline",), ("model.image_newline",), (pr.n_embed,)),
             Entry(("view_seperator",), ("model.view_seperator",), (pr.n_embed,))])


def decoder_entries(cfg: ModelConfig) -> list[Entry]:
  dc = cfg.decoder
  h, d = dc.hidden_size, ("decoder",)
  e = [Entry(d + ("embed_tokens", "embedding"), ("model.embed_tokens.weight",), (dc.vocab_size, h))]
  for i in range(dc.num_hidden_layers):
    src, dst = f"model.layers.{i}.", d + ("layers", i)
    e += _norm(dst + ("input_layernorm",), src + "input_layernorm", h, bias=False)
    e += _norm(dst + ("post_attention_layernorm",), src + "post_attention_layernorm", h, bias=False)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
      e += _linear(dst + ("self_attn", proj), src + "self_attn." + proj, h, h, bias=False)
    m = dst + ("mlp",)
    if dc.is_moe_layer(i):
      e += _linear(m + ("gate",), src + "mlp.gate", dc.n_routed_experts, h, bias=False)
      inter = dc.moe_intermediate_size
      for proj, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
        names = tuple(f"{src}mlp.experts.{x}.{proj}.weight" for x in range(dc.n_routed_experts))
        e.append(Entry(m + ("experts", proj), names, shape, "stackT"))
      if dc.n_shared_experts:
        si = dc.shared_intermediate_size
        e += _linear(m + ("shared_experts", "gate_proj"), src + "mlp.shared_experts.gate_proj", si, h, bias=False)
        e += _linear(m + ("shared_experts", "up_proj"), src + "mlp.shared_experts.up_proj", si, h, bias=False)
        e += _linear(m + ("shared_experts", "down_proj"), src + "mlp.shared_experts.down_proj", h, si, bias=False)
    else:
      ii = dc.intermediate_size
      e += _linear(m + ("gate_proj",), src + "mlp.gate_proj", ii, h, bias=False)
      e += _linear(m + ("up_proj",), src + "mlp.up_proj", ii, h, bias=False)
      e += _linear(m + ("down_proj",), src + "mlp.down_proj", h, ii, bias=False)
  e += _norm(d + ("norm",), "model.norm", h, bias=False)
  e += [Entry(d + ("lm_head", "kernel"), ("lm_head.weight",), (dc.vocab_size, h), "T")]
  return e


def manifest(cfg: ModelConfig, parts=("sam", "clip", "projector", "decoder")) -> list[Entry]:
  fns = {"sam": sam_entries, "clip": clip_entries, "projector": projector_entries, "decoder": decoder_entries}
  return [e for part in parts for e in fns[part](cfg)]


def source_shapes(entries: list[Entry]) -> dict[str, tuple[int, ...]]:
  """Every source tensor name the entries read, with its expected shape."""
  out: dict[str, tuple[int, ...]] = {}
  for e in entries:
    for s in e.sources:
      out[s] = e.src_shape
  return out
