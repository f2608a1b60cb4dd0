"""Training data: JSONL (or synthetic) records -> preprocessed examples -> padded batches, through grain.

A JSONL line is one example:
  {"image": "a.png" | ["a.png", "b.png"], "prompt": "<image>\\nFree OCR.", "answer": "...", "mode": "gundam"}
Image paths are relative to the JSONL file; `prompt` defaults to the config's, `mode` to `data.mode`; the
prompt must hold one `<image>` per image. Other keys are ignored. A malformed line is reported as `FILE:LINE:
why`, then skipped (counted, with a warning) or fatal, by `data.bad_lines`.

The pipeline (grain): records -> this process's shard -> seeded shuffle (a new order each epoch) -> repeat ->
preprocess (Pillow + tokenizer; in `data.workers` processes) -> batches padded to the smallest length bucket.
The iterator's state is a small JSON-able dict saved with every checkpoint.

Sequence layout: [BOS] prompt (with image placeholders) answer [EOS]. The loss is taken on the answer tokens and
the final EOS only: `loss_mask[t]` says whether the prediction made at position t (of token t+1) counts. An
example longer than the largest bucket has its answer cut (and then no EOS) and is counted as truncated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from dsocr_jax.config import ImageMode, get_mode
from train import synthetic
from train.config import DataSection

log = logging.getLogger(__name__)
IMAGE_MARKER = "<image>"


# ------------------------------------------------------------------------------------------------ records


def parse_record(obj: Any, base_dir: str, default_prompt: str, default_mode: str) -> dict:
  """One JSONL object -> a validated record; raises ValueError naming the offending field."""
  if not isinstance(obj, dict):
    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
  images = obj.get("image", [])
  if isinstance(images, str):
    images = [images]
  if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
    raise ValueError("image: expected a path or a list of paths")
  paths = [p if os.path.isabs(p) else os.path.join(base_dir, p) for p in images]
  for p in paths:
    if not os.path.isfile(p):
      raise ValueError(f"image: no such file {p}")
  prompt = obj.get("prompt", default_prompt)
  if not isinstance(prompt, str):
    raise ValueError("prompt: expected a string")
  if prompt.count(IMAGE_MARKER) != len(paths):
    raise ValueError(f"prompt: holds {prompt.count(IMAGE_MARKER)} {IMAGE_MARKER} marker(s) for {len(paths)} image(s)")
  answer = obj.get("answer")
  if not isinstance(answer, str):
    raise ValueError("answer: missing or not a string")
  mode = obj.get("mode", default_mode)
  if not isinstance(mode, str):
    raise ValueError("mode: expected a string")
  get_mode(mode)  # ValueError "mode: unknown mode ..."
  return {"images": paths, "prompt": prompt, "answer": answer, "mode": mode}


def read_jsonl(path: str, cfg: DataSection) -> list[dict]:
  """All valid records of a JSONL file; malformed lines skipped with one warning, or fatal (`bad_lines`)."""
  base_dir = os.path.dirname(os.path.abspath(path))
  records, bad = [], []
  try:
    f = open(path, encoding="utf-8")
  except OSError as e:
    raise ValueError(f"data: cannot open {path}: {e.strerror}") from None
  with f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
        records.append(parse_record(obj, base_dir, cfg.prompt, cfg.mode))
      except ValueError as e:
        message = f"{path}:{lineno}: {e}"
        if cfg.bad_lines == "fail":
          raise ValueError(f"data: {message}") from None
        bad.append(message)
  if bad:
    log.warning("data: skipped %d malformed line(s) of %s; first: %s", len(bad), path, bad[0])
  if not records:
    raise ValueError(f"data: {path} holds no valid example")
  return records


def synthetic_records(cfg: DataSection, split: str) -> list[dict]:
  s = cfg.synthetic
  n = s.train_examples if split == "train" else s.eval_examples
  seed = s.seed if split == "train" else s.seed + 1_000_003  # disjoint from the training set
  return [{"synthetic": (seed, i), "prompt": cfg.prompt, "mode": cfg.mode} for i in range(n)]


def records_for(cfg: DataSection, split: str) -> list[dict]:
  path = cfg.train if split == "train" else cfg.eval
  if path is not None:
    return read_jsonl(path, cfg)
  if split == "eval" and cfg.train is not None:
    return []  # a JSONL run without an eval file has no eval split
  return synthetic_records(cfg, split)


# ----------------------------------------------------------------------------------------- preprocessing


class Preprocess(grain.transforms.Map):
  """record -> example (numpy), in a grain worker: images opened and preprocessed, text tokenised."""

  def __init__(self, cfg: DataSection, tokenizer_path: str):
    self.cfg = cfg
    self.tokenizer_path = tokenizer_path
    self._tokenizer = None

  def __getstate__(self):  # workers load their own tokenizer
    return {"cfg": self.cfg, "tokenizer_path": self.tokenizer_path, "_tokenizer": None}

  @property
  def tokenizer(self):
    if self._tokenizer is None:
      from dsocr_jax.text.tokenizer import Tokenizer
      self._tokenizer = Tokenizer.from_file(self.tokenizer_path)
    return self._tokenizer

  def _images(self, record: dict) -> list:
    from dsocr_jax.image.decode import open_image
    if "synthetic" in record:
      seed, index = record["synthetic"]
      s = self.cfg.synthetic
      img, text = synthetic.example(seed, index, width=s.width, height=s.height, font_size=s.font_size,
                                    min_chars=s.min_chars, max_chars=s.max_chars)
      record["answer"] = text
      return [img]
    return [open_image(p) for p in record["images"]]

  def mode(self, name: str) -> ImageMode:
    side = self.cfg.image_size
    return get_mode(name) if side is None else ImageMode(f"square{side}", side, side, False)

  def map(self, record: dict) -> dict:
    from dsocr_jax.image.preprocess import preprocess
    from dsocr_jax.text.prompt import build_prompt
    record = dict(record)
    images = [preprocess(img, self.mode(record["mode"]), min_crops=self.cfg.min_crops, max_crops=self.cfg.max_crops)
              for img in self._images(record)]
    tok = self.tokenizer
    prompt = build_prompt(record["prompt"], images, tok)
    answer_ids = tok.encode(record["answer"]) + [tok.eos_id]
    max_len = self.cfg.buckets[-1]
    n_prompt = len(prompt)
    if n_prompt >= max_len:
      raise ValueError(f"data: a prompt of {n_prompt} tokens does not fit the largest bucket {max_len}")
    truncated = n_prompt + len(answer_ids) > max_len
    answer_ids = answer_ids[:max_len - n_prompt]
    ids = np.concatenate([prompt.input_ids, np.asarray(answer_ids, np.int32)])
    loss_mask = np.zeros(len(ids), bool)
    loss_mask[n_prompt - 1:len(ids) - 1] = True  # predictions of answer tokens (and the EOS)
    return {
        "ids": ids, "images_seq_mask": np.concatenate([prompt.images_seq_mask, np.zeros(len(answer_ids), bool)]),
        "loss_mask": loss_mask, "prompt_len": n_prompt, "answer": record["answer"], "truncated": truncated,
        "views": [(im.global_view, im.tiles) for im in images],
        "crops": tuple(tuple(int(v) for v in im.spatial_crop) for im in images),
    }


# ------------------------------------------------------------------------------------------------ batches


@dataclasses.dataclass
class Batch:
  """Padded arrays for the jitted step, plus the static image layout and host-side text."""
  arrays: dict[str, Any]  # input_ids, positions, valid, images_seq_mask, loss_mask, targets: [B, T]; images
  layout: tuple  # per image group: (rows, crops): which rows share one image geometry, and its tile grids
  answers: list[str]
  prompt_lens: np.ndarray  # [B]
  truncated: int

  @property
  def num_loss_tokens(self) -> int:
    return int(np.sum(self.arrays["loss_mask"]))


def bucket_length(n: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if n <= b:
      return b
  raise ValueError(f"data: sequence of {n} tokens exceeds the largest bucket {buckets[-1]}")


def image_key(example: dict) -> tuple:
  return tuple((gv.shape, tiles.shape, crop) for (gv, tiles), crop in zip(example["views"], example["crops"]))


def collate(examples: Sequence[dict], buckets: Sequence[int], pad_id: int) -> Batch:
  """Pads to the smallest bucket that fits; stacks the images of rows with identical image geometry."""
  b = len(examples)
  t = bucket_length(max(len(e["ids"]) for e in examples), buckets)
  ids = np.full((b, t), pad_id, np.int32)
  valid, img_mask, loss_mask = (np.zeros((b, t), bool) for _ in range(3))
  for i, e in enumerate(examples):
    n = len(e["ids"])
    ids[i, :n], valid[i, :n] = e["ids"], True
    img_mask[i, :n], loss_mask[i, :n] = e["images_seq_mask"], e["loss_mask"]
  targets = np.concatenate([ids[:, 1:], np.full((b, 1), pad_id, np.int32)], axis=1)
  groups: dict[tuple, list[int]] = {}
  for i, e in enumerate(examples):
    groups.setdefault(image_key(e), []).append(i)
  layout, images = [], []
  for rows in groups.values():
    views = examples[rows[0]]["views"]
    if not views:
      continue
    layout.append((tuple(rows), examples[rows[0]]["crops"]))
    images.append([(np.stack([examples[r]["views"][j][0] for r in rows]),
                    np.stack([examples[r]["views"][j][1] for r in rows])) for j in range(len(views))])
  arrays = dict(input_ids=ids, positions=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
                valid=valid, images_seq_mask=img_mask, loss_mask=loss_mask, targets=targets, images=images)
  return Batch(arrays=arrays, layout=tuple(layout), answers=[e["answer"] for e in examples],
               prompt_lens=np.asarray([e["prompt_len"] for e in examples], np.int32),
               truncated=sum(bool(e["truncated"]) for e in examples))


class _Collate:
  """Picklable batch_fn for grain."""

  def __init__(self, buckets, pad_id):
    self.buckets, self.pad_id = tuple(buckets), pad_id

  def __call__(self, examples):
    return collate(examples, self.buckets, self.pad_id)


def pad_id_of(tokenizer_path: str) -> int:
  from dsocr_jax.text.tokenizer import Tokenizer
  tok = Tokenizer.from_file(tokenizer_path)
  return tok.pad_id if tok.pad_id is not None else tok.eos_id


def dataset(records: list[dict], cfg: DataSection, tokenizer_path: str, *, train: bool, process_index: int = 0,
            process_count: int = 1) -> grain.IterDataset:
  """The grain pipeline over `records`: training repeats forever in a new seeded order each epoch; eval is one
  ordered pass. Each process reads the records `process_index::process_count`."""
  ds = grain.MapDataset.source(records)[process_index::process_count]
  if train:
    ds = ds.shuffle(seed=cfg.shuffle_seed).repeat(None)
  ds = ds.map(Preprocess(cfg, tokenizer_path)).to_iter_dataset()
  ds = ds.batch(cfg.batch_size, drop_remainder=train, batch_fn=_Collate(cfg.buckets, pad_id_of(tokenizer_path)))
  if cfg.workers > 0:
    ds = ds.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(num_workers=cfg.workers))
  return ds


def iterate(ds: grain.IterDataset, state: dict | None = None) -> Iterator[Batch]:
  """An iterator over `ds`, restored to `state` (from `get_state()`) when given."""
  it = iter(ds)
  if state is not None:
    it.set_state(state)
  return it
