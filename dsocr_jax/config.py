"""Typed configuration for DeepSeek-OCR, and the loader for the released hub `config.json`.

One `ModelConfig` drives the model, the checkpoint loader, the converter, serving and training. It is read
from the released hub format (shared spec section 7): decoder fields at the top level (mirrored in
`language_config`), the vision encoder described by `vision_config.width.{sam_vit_b, clip-l-14-224}`. The
official code hard-codes several vision values; the optional keys `out_chans`, `mlp_ratio`, `window_size`
and `ffn_hidden_size` let a config override them, and default to the released model's values.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class SamConfig:
  """SAM-ViT-B image encoder (spec 2.1)."""
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp_ratio: float = 4.0
  window_size: int = 14
  global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
  out_chans: int = 256
  downsample_channels: tuple[int, ...] = (512, 1024)
  patch_size: int = 16
  img_size: int = 1024  # the pos_embed table is trained for this size: a (img_size/patch)^2 grid
  layer_norm_eps: float = 1e-6

  @property
  def head_dim(self) -> int:
    return self.width // self.heads

  @property
  def pos_grid(self) -> int:
    return self.img_size // self.patch_size

  @property
  def mlp_dim(self) -> int:
    return int(self.width * self.mlp_ratio)

  @property
  def output_channels(self) -> int:
    return self.downsample_channels[-1]


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """CLIP-L vision transformer fed with SAM features (spec 2.2)."""
  width: int = 1024
  layers: int = 24
  heads: int = 16
  ffn_hidden_size: int = 4096
  image_size: int = 224
  patch_size: int = 14
  layer_norm_eps: float = 1e-5

  @property
  def head_dim(self) -> int:
    return self.width // self.heads

  @property
  def pos_grid(self) -> int:
    return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
  """Linear 2048 -> 1280 projector (spec 2.3)."""
  input_dim: int = 2048
  n_embed: int = 1280
  projector_type: str = "linear"


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """DeepSeek3B-MoE-A570M decoder (spec 3)."""
  vocab_size: int = 129280
  hidden_size: int = 1280
  num_hidden_layers: int = 12
  num_attention_heads: int = 10
  num_key_value_heads: int = 10
  intermediate_size: int = 6848
  moe_intermediate_size: int = 896
  n_routed_experts: int = 64
  n_shared_experts: int = 2
  num_experts_per_tok: int = 6
  first_k_dense_replace: int = 1
  moe_layer_freq: int = 1
  norm_topk_prob: bool = False
  routed_scaling_factor: float = 1.0
  scoring_func: str = "softmax"
  topk_method: str = "greedy"
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  max_position_embeddings: int = 8192
  bos_token_id: int = 0
  eos_token_id: int = 1
  aux_loss_alpha: float = 0.001
  seq_aux: bool = True
  tie_word_embeddings: bool = False

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def shared_intermediate_size(self) -> int:
    return self.moe_intermediate_size * self.n_shared_experts

  def is_moe_layer(self, layer: int) -> bool:
    return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  sam: SamConfig = SamConfig()
  clip: ClipConfig = ClipConfig()
  projector: ProjectorConfig = ProjectorConfig()
  decoder: DecoderConfig = DecoderConfig()
  tile_tag: str = "2D"
  # Unused by every implementation (the global view always comes after the tiles, spec 8.3); kept so that
  # a config round-trips.
  global_view_pos: str = "head"

  def __post_init__(self):
    validate(self)

  @property
  def image_embed_dim(self) -> int:
    return self.projector.n_embed


@dataclasses.dataclass(frozen=True)
class ImageMode:
  """A resolution mode (spec 4.1): global view size, tile size, and whether to tile."""
  name: str
  base_size: int
  image_size: int
  crop_mode: bool

  @property
  def global_grid(self) -> int:
    return self.base_size // 64

  @property
  def tile_grid(self) -> int:
    return self.image_size // 64


MODES: dict[str, ImageMode] = {
    m.name: m for m in (
        ImageMode("tiny", 512, 512, False),
        ImageMode("small", 640, 640, False),
        ImageMode("base", 1024, 1024, False),
        ImageMode("large", 1280, 1280, False),
        ImageMode("gundam", 1024, 640, True),
        # Gundam-M is described only in the paper and as a hook in the vLLM code; the released README does not
        # list it as supported (spec 4.1). Offered as an option.
        ImageMode("gundam-m", 1280, 1024, True),
    )
}


def get_mode(name: str) -> ImageMode:
  try:
    return MODES[name.lower()]
  except KeyError:
    raise ValueError(f"mode: unknown mode {name!r}; expected one of {sorted(MODES)}") from None


def _check(cond: bool, key: str, msg: str):
  if not cond:
    raise ValueError(f"config: {key}: {msg}")


def validate(cfg: ModelConfig) -> None:
  """Raises ValueError naming the key of an invalid or contradictory value."""
  s, c, p, d = cfg.sam, cfg.clip, cfg.projector, cfg.decoder
  for key, value in [("sam_vit_b.width", s.width), ("sam_vit_b.layers", s.depth), ("sam_vit_b.heads", s.heads),
                     ("sam_vit_b.out_chans", s.out_chans), ("sam_vit_b.window_size", s.window_size),
                     ("clip-l-14-224.width", c.width), ("clip-l-14-224.layers", c.layers),
                     ("clip-l-14-224.heads", c.heads), ("clip-l-14-224.ffn_hidden_size", c.ffn_hidden_size),
                     ("projector_config.n_embed", p.n_embed), ("vocab_size", d.vocab_size),
                     ("hidden_size", d.hidden_size), ("num_hidden_layers", d.num_hidden_layers),
                     ("num_attention_heads", d.num_attention_heads), ("intermediate_size", d.intermediate_size),
                     ("moe_intermediate_size", d.moe_intermediate_size), ("n_routed_experts", d.n_routed_experts),
                     ("num_experts_per_tok", d.num_experts_per_tok)]:
    _check(isinstance(value, int) and value > 0, key, f"must be a positive integer, got {value!r}")
  _check(s.width % s.heads == 0, "sam_vit_b.heads", f"width {s.width} is not divisible by heads {s.heads}")
  _check(all(0 <= i < s.depth for i in s.global_attn_indexes), "sam_vit_b.global_attn_indexes",
         f"{list(s.global_attn_indexes)} must lie in [0, {s.depth})")
  _check(len(s.downsample_channels) == 2, "sam_vit_b.downsample_channels", "needs exactly two entries (net_2, net_3)")
  _check(s.mlp_ratio > 0, "sam_vit_b.mlp_ratio", "must be positive")
  _check(c.width % c.heads == 0, "clip-l-14-224.heads", f"width {c.width} is not divisible by heads {c.heads}")
  _check(s.output_channels == c.width, "sam_vit_b.downsample_channels",
         f"net_3 output {s.output_channels} must equal the CLIP width {c.width} (SAM features replace CLIP's patches)")
  _check(p.projector_type == "linear", "projector_config.projector_type",
         f"only 'linear' is used by DeepSeek-OCR, got {p.projector_type!r}")
  _check(p.input_dim == c.width + s.output_channels, "projector_config.input_dim",
         f"{p.input_dim} != CLIP width {c.width} + SAM channels {s.output_channels}")
  _check(p.n_embed == d.hidden_size, "projector_config.n_embed", f"{p.n_embed} != hidden_size {d.hidden_size}")
  _check(d.hidden_size % d.num_attention_heads == 0, "num_attention_heads",
         f"hidden_size {d.hidden_size} is not divisible by {d.num_attention_heads}")
  _check(d.num_key_value_heads == d.num_attention_heads, "num_key_value_heads",
         f"DeepSeek-OCR uses plain MHA: expected {d.num_attention_heads}, got {d.num_key_value_heads}")
  _check(d.num_experts_per_tok <= d.n_routed_experts, "num_experts_per_tok",
         f"{d.num_experts_per_tok} > n_routed_experts {d.n_routed_experts}")
  _check(0 <= d.first_k_dense_replace <= d.num_hidden_layers, "first_k_dense_replace",
         f"{d.first_k_dense_replace} must lie in [0, num_hidden_layers={d.num_hidden_layers}]")
  _check(d.moe_layer_freq >= 1, "moe_layer_freq", "must be >= 1")
  _check(d.scoring_func == "softmax", "scoring_func", f"only 'softmax' is supported, got {d.scoring_func!r}")
  _check(d.topk_method == "greedy", "topk_method", f"only 'greedy' is supported, got {d.topk_method!r}")
  _check(d.rms_norm_eps > 0, "rms_norm_eps", "must be positive")
  _check(d.rope_theta > 0, "rope_theta", "must be positive")
  _check(0 <= d.bos_token_id < d.vocab_size, "bos_token_id", f"{d.bos_token_id} outside the vocabulary")
  _check(0 <= d.eos_token_id < d.vocab_size, "eos_token_id", f"{d.eos_token_id} outside the vocabulary")
  _check(not d.tie_word_embeddings, "tie_word_embeddings", "DeepSeek-OCR has an untied lm_head")
  _check(cfg.tile_tag == "2D", "tile_tag", f"only '2D' is implemented by DeepSeek-OCR, got {cfg.tile_tag!r}")


# ----------------------------------------------------------------------------------------------- hub format

_DECODER_KEYS = [f.name for f in dataclasses.fields(DecoderConfig)]


def from_hub_dict(d: Mapping[str, Any]) -> ModelConfig:
  """Builds a ModelConfig from the released hub config.json structure."""
  if not isinstance(d, Mapping):
    raise ValueError("config: the top level must be a JSON object")
  _check(not d.get("use_mla", False), "use_mla", "DeepSeek-OCR's decoder is plain MHA (use_mla must be false)")
  if d.get("rope_scaling") is not None:
    raise ValueError("config: rope_scaling: DeepSeek-OCR uses no RoPE scaling (expected null)")
  lang = d.get("language_config") or {}
  dec_kwargs = {}
  for key in _DECODER_KEYS:
    top, sub = d.get(key), lang.get(key)
    if top is not None and sub is not None and top != sub:
      raise ValueError(f"config: {key}: top level says {top!r} but language_config says {sub!r}")
    value = top if top is not None else sub
    if value is not None:
      dec_kwargs[key] = value
  if "num_key_value_heads" not in dec_kwargs and "num_attention_heads" in dec_kwargs:
    dec_kwargs["num_key_value_heads"] = dec_kwargs["num_attention_heads"]
  for key, value in dec_kwargs.items():
    default = getattr(DecoderConfig, key)
    if isinstance(default, bool):
      _check(isinstance(value, bool), key, f"must be true or false, got {value!r}")
    elif isinstance(default, int):
      _check(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
    elif isinstance(default, float):
      _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"must be a number, got {value!r}")
      dec_kwargs[key] = float(value)
  decoder = DecoderConfig(**dec_kwargs)

  vision = d.get("vision_config") or {}
  width = vision.get("width") or {}
  sam_d = width.get("sam_vit_b") or {}
  clip_d = width.get("clip-l-14-224") or {}
  sam = SamConfig(
      width=sam_d.get("width", SamConfig.width), depth=sam_d.get("layers", SamConfig.depth),
      heads=sam_d.get("heads", SamConfig.heads), mlp_ratio=float(sam_d.get("mlp_ratio", SamConfig.mlp_ratio)),
      window_size=sam_d.get("window_size", SamConfig.window_size),
      global_attn_indexes=tuple(sam_d.get("global_attn_indexes", SamConfig.global_attn_indexes)),
      out_chans=sam_d.get("out_chans", SamConfig.out_chans),
      downsample_channels=tuple(sam_d.get("downsample_channels", SamConfig.downsample_channels)))
  clip = ClipConfig(
      width=clip_d.get("width", ClipConfig.width), layers=clip_d.get("layers", ClipConfig.layers),
      heads=clip_d.get("heads", ClipConfig.heads),
      ffn_hidden_size=clip_d.get("ffn_hidden_size", ClipConfig.ffn_hidden_size),
      image_size=clip_d.get("image_size", ClipConfig.image_size),
      patch_size=clip_d.get("patch_size", ClipConfig.patch_size))
  proj_d = d.get("projector_config") or {}
  projector = ProjectorConfig(
      input_dim=proj_d.get("input_dim", clip.width + sam.output_channels),
      n_embed=proj_d.get("n_embed", decoder.hidden_size),
      projector_type=proj_d.get("projector_type", "linear"))
  return ModelConfig(sam=sam, clip=clip, projector=projector, decoder=decoder,
                     tile_tag=d.get("tile_tag", "2D"), global_view_pos=d.get("global_view_pos", "head"))


def to_hub_dict(cfg: ModelConfig) -> dict[str, Any]:
  """Writes the config back in the hub format (what our converted checkpoints carry)."""
  dec = dataclasses.asdict(cfg.decoder)
  lang = dict(dec, architectures=["DeepseekV2ForCausalLM"], use_mla=False, q_lora_rank=None, kv_lora_rank=None,
              lm_head=True, rm_head=False)
  s, c = cfg.sam, cfg.clip
  return dict(
      dec, architectures=["DeepseekOCRForCausalLM"], model_type="DeepseekOCR", use_mla=False, q_lora_rank=None,
      kv_lora_rank=None, rope_scaling=None, lm_head=True, rm_head=False, tile_tag=cfg.tile_tag,
      global_view_pos=cfg.global_view_pos, candidate_resolutions=[[1024, 1024]], language_config=lang,
      projector_config=dict(input_dim=cfg.projector.input_dim, n_embed=cfg.projector.n_embed,
                            projector_type=cfg.projector.projector_type, model_type="mlp_projector"),
      vision_config=dict(image_size=1024, model_name="deeplip_b_l", model_type="vision", width={
          "clip-l-14-224": dict(heads=c.heads, layers=c.layers, width=c.width, image_size=c.image_size,
                                patch_size=c.patch_size, ffn_hidden_size=c.ffn_hidden_size),
          "sam_vit_b": dict(heads=s.heads, layers=s.depth, width=s.width,
                            global_attn_indexes=list(s.global_attn_indexes),
                            downsample_channels=list(s.downsample_channels), out_chans=s.out_chans,
                            mlp_ratio=s.mlp_ratio, window_size=s.window_size)}))


def load_config(path: str | os.PathLike) -> ModelConfig:
  """Loads a hub-format config.json (a file, or a directory holding one)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  try:
    with open(path) as f:
      raw = json.load(f)
  except FileNotFoundError:
    raise ValueError(f"config: no config.json at {path}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"config: {path} is not valid JSON: {e}") from None
  return from_hub_dict(raw)


PRESETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def preset(name: str) -> ModelConfig:
  """`deepseek-ocr` (the released size) or `tiny` (fast tests), from configs/<name>.json."""
  path = os.path.join(PRESETS_DIR, f"{name}.json")
  if not os.path.exists(path):
    raise ValueError(f"preset: unknown preset {name!r} (no {path})")
  return load_config(path)
