"""Typed training configuration: YAML file -> nested frozen dataclasses, plus `key=value` overrides.

Every key is checked against the dataclass fields and every value against the field's type, so a typo or a
wrong type fails at start-up with a ValueError naming the dotted key (`optim.lr: expected a number, got 'x'`).
Relative paths in the file (data files, tokenizer, init checkpoint) are resolved against the file's folder.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Mapping

import yaml

FREEZABLE = ("sam", "clip", "projector", "vision", "decoder", "embeddings", "lm_head")


@dataclasses.dataclass(frozen=True)
class ModelSection:
  preset: str | None = "tiny"  # a name in configs/ (dsocr_jax.config.preset)
  config: str | None = None  # or a hub-format config.json
  init: str | None = None  # start from this converted or released checkpoint (load_model)
  compute_dtype: str = "auto"  # auto: bfloat16 on accelerators, float32 on CPU; master weights stay float32
  freeze: tuple[str, ...] = ()
  capacity_factor: float | None = None  # expert-parallel capacity (dsocr_jax.sharding); None: no dropping


@dataclasses.dataclass(frozen=True)
class SyntheticSection:
  """Rendered-text examples (train/synthetic.py), used when no JSONL is given."""
  train_examples: int = 256
  eval_examples: int = 16
  seed: int = 0
  width: int = 192
  height: int = 64
  min_chars: int = 3
  max_chars: int = 10
  font_size: int = 28


@dataclasses.dataclass(frozen=True)
class DataSection:
  train: str | None = None  # JSONL; None: synthetic
  eval: str | None = None
  synthetic: SyntheticSection = SyntheticSection()
  prompt: str = "<image>\nFree OCR."  # for examples that carry no prompt (synthetic)
  mode: str = "tiny"  # default resolution mode; an example's "mode" overrides it
  # A square no-crop view of this side (a multiple of 64) for EVERY example instead of the modes: not an official
  # mode (the model resizes its position tables to any grid); cheap views for CPU smoke runs.
  image_size: int | None = None
  min_crops: int = 2
  max_crops: int = 6
  batch_size: int = 4  # per process, per micro-batch
  buckets: tuple[int, ...] = (128, 256, 512, 1024)  # padded sequence lengths; the last is the maximum
  workers: int = 0  # grain worker processes for Pillow preprocessing; 0 = in the main process
  shuffle_seed: int = 0
  bad_lines: str = "skip"  # skip (warn with a count) | fail


@dataclasses.dataclass(frozen=True)
class OptimSection:
  lr: float = 1e-4
  warmup_steps: int = 100
  decay_steps: int | None = None  # cosine decay length after warmup; None: until `steps`
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0
  grad_accum: int = 1  # micro-batches per optimizer step


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
  every: int = 500
  keep: int = 3
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class EvalSection:
  every: int = 0  # 0: only at the end
  batches: int = 2
  max_new_tokens: int = 64


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  model: ModelSection = ModelSection()
  data: DataSection = DataSection()
  optim: OptimSection = OptimSection()
  checkpoint: CheckpointSection = CheckpointSection()
  eval: EvalSection = EvalSection()
  tokenizer: str | None = None  # tokenizer.json; default: the init checkpoint's
  steps: int = 1000  # train until this global step
  seed: int = 0
  log_every: int = 1
  mesh: str | None = None  # e.g. "data=2,expert=4" (dsocr_jax.sharding.parse_mesh)

  def __post_init__(self):
    validate(self)


def _err(key: str, msg: str) -> ValueError:
  return ValueError(f"config: {key}: {msg}")


def validate(cfg: TrainConfig) -> None:
  checks = [
      (cfg.steps >= 0, "steps", "must be >= 0"),
      (cfg.log_every >= 1, "log_every", "must be >= 1"),
      (cfg.data.batch_size >= 1, "data.batch_size", "must be >= 1"),
      (cfg.data.workers >= 0, "data.workers", "must be >= 0"),
      (len(cfg.data.buckets) > 0 and all(b > 0 for b in cfg.data.buckets)
       and list(cfg.data.buckets) == sorted(set(cfg.data.buckets)), "data.buckets",
       "must be a non-empty increasing list of positive lengths"),
      (cfg.data.bad_lines in ("skip", "fail"), "data.bad_lines", f"must be 'skip' or 'fail', got {cfg.data.bad_lines!r}"),
      (cfg.data.image_size is None or (cfg.data.image_size > 0 and cfg.data.image_size % 64 == 0),
       "data.image_size", "must be a positive multiple of 64"),
      (1 <= cfg.data.min_crops <= cfg.data.max_crops, "data.max_crops", "need 1 <= min_crops <= max_crops"),
      (cfg.optim.lr > 0, "optim.lr", "must be positive"),
      (cfg.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0"),
      (cfg.optim.decay_steps is None or cfg.optim.decay_steps > 0, "optim.decay_steps", "must be positive"),
      (0 <= cfg.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", "must lie in [0, 1]"),
      (cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0"),
      (cfg.optim.clip_norm >= 0, "optim.clip_norm", "must be >= 0 (0 disables clipping)"),
      (cfg.optim.grad_accum >= 1, "optim.grad_accum", "must be >= 1"),
      (cfg.checkpoint.every >= 1, "checkpoint.every", "must be >= 1"),
      (cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1"),
      (cfg.eval.every >= 0, "eval.every", "must be >= 0"),
      (cfg.eval.batches >= 0, "eval.batches", "must be >= 0"),
      (cfg.eval.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1"),
      (cfg.model.compute_dtype in ("auto", "float32", "bfloat16"), "model.compute_dtype",
       f"must be auto, float32 or bfloat16, got {cfg.model.compute_dtype!r}"),
      ((cfg.model.preset is None) != (cfg.model.config is None) or cfg.model.init is not None, "model.preset",
       "give exactly one of model.preset and model.config (or model.init)"),
      (cfg.model.capacity_factor is None or cfg.model.capacity_factor > 0, "model.capacity_factor",
       "must be positive"),
      (cfg.data.synthetic.min_chars >= 1 and cfg.data.synthetic.max_chars >= cfg.data.synthetic.min_chars,
       "data.synthetic.max_chars", "need 1 <= min_chars <= max_chars"),
      (cfg.data.synthetic.train_examples >= 1, "data.synthetic.train_examples", "must be >= 1"),
  ]
  for ok, key, msg in checks:
    if not ok:
      raise _err(key, msg)
  for name in cfg.model.freeze:
    if name not in FREEZABLE:
      raise _err("model.freeze", f"unknown part {name!r}; expected some of {list(FREEZABLE)}")


# ------------------------------------------------------------------------------------------- dict -> dataclass


def _coerce(value: Any, tp: Any, key: str) -> Any:
  """`value` checked (and lightly converted: int -> float, list -> tuple) against the annotation `tp`."""
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
      return None
    errors = []
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _coerce(value, arg, key)
      except ValueError as e:
        errors.append(str(e))
    raise errors[-1] if len(errors) == 1 else _err(key, f"unexpected value {value!r}")
  if dataclasses.is_dataclass(tp):
    if not isinstance(value, Mapping):
      raise _err(key, f"expected a section (mapping), got {value!r}")
    return from_dict(tp, value, prefix=key + ".")
  if origin is tuple:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
      raise _err(key, f"expected a list, got {value!r}")
    (elem, _) = typing.get_args(tp)
    return tuple(_coerce(v, elem, key) for v in value)
  if tp is bool:
    if not isinstance(value, bool):
      raise _err(key, f"expected true or false, got {value!r}")
    return value
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise _err(key, f"expected an integer, got {value!r}")
    return value
  if tp is float:
    if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
      try:
        value = float(value)
      except ValueError:
        pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise _err(key, f"expected a number, got {value!r}")
    return float(value)
  if tp is str:
    if not isinstance(value, str):
      raise _err(key, f"expected a string, got {value!r}")
    return value
  raise TypeError(f"unsupported annotation {tp!r} for {key}")


def from_dict(cls, d: Mapping[str, Any], prefix: str = ""):
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  for k in d:
    if k not in names:
      raise _err(prefix + str(k), f"unknown key; expected one of {sorted(names)}")
  kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in d.items()}
  return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
  parts = dotted.split(".")
  node = tree
  for p in parts[:-1]:
    child = node.setdefault(p, {})
    if not isinstance(child, dict):
      raise _err(dotted, f"{p} is not a section")
    node = child
  node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict:
  """`["optim.lr=3e-4", "model.freeze=[sam,clip]"]` -> nested dict; values are parsed as YAML."""
  tree: dict = {}
  for item in items:
    if "=" not in item:
      raise ValueError(f"config: override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    try:
      value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
      value = raw
    _set_dotted(tree, key.strip(), value)
  return tree


def _merge(base: dict, extra: Mapping) -> dict:
  out = dict(base)
  for k, v in extra.items():
    out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
  return out


_PATH_KEYS = (("data", "train"), ("data", "eval"), ("model", "init"), ("model", "config"), ("tokenizer",))


def _resolve_paths(tree: dict, base_dir: str) -> None:
  for path in _PATH_KEYS:
    node = tree
    for p in path[:-1]:
      node = node.get(p) if isinstance(node, dict) else None
    if isinstance(node, dict) and isinstance(node.get(path[-1]), str):
      value = os.path.expanduser(os.path.expandvars(node[path[-1]]))
      node[path[-1]] = value if os.path.isabs(value) else os.path.normpath(os.path.join(base_dir, value))


def load(path: str | None = None, overrides: list[str] = (), extra: Mapping | None = None) -> TrainConfig:
  """The YAML file (relative paths resolved against its folder), then `extra` and `key=value` overrides
  (relative paths there resolved against the working directory)."""
  tree: dict = {}
  if path is not None:
    try:
      with open(path) as f:
        tree = yaml.safe_load(f) or {}
    except FileNotFoundError:
      raise ValueError(f"config: no such file {path}") from None
    except yaml.YAMLError as e:
      raise ValueError(f"config: {path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
      raise ValueError(f"config: {path}: the top level must be a mapping")
    _resolve_paths(tree, os.path.dirname(os.path.abspath(path)))
  late = _merge(dict(extra or {}), parse_overrides(list(overrides)))
  _resolve_paths(late, os.getcwd())
  return from_dict(TrainConfig, _merge(tree, late))


def to_dict(cfg: TrainConfig) -> dict:
  return dataclasses.asdict(cfg)
