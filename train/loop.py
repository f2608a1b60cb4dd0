"""The training loop: build or load the model, resume from the newest checkpoint, step, log, evaluate, save.

One optimizer step = `optim.grad_accum` micro-batches of `data.batch_size` rows per process. The loss of a
step is normalised by the step's total count of answer tokens before differentiation, so accumulation is the
same objective as one large batch. `stop_at` (`--steps`) is where this run stops; the learning-rate schedule
follows the config's `steps` (the planned length), so stopping and resuming never changes it.

Per step, one JSON line goes to WORKDIR/metrics.jsonl: step, loss (answer cross-entropy), aux_loss, lr,
grad_norm, tokens_per_s, step_time_s, and more; eval lines carry `eval_loss` and `eval_cer`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dsocr_jax.metrics_text import cer
from train import data as data_lib
from train import optim, steps
from train.checkpoints import Checkpointer
from train.config import TrainConfig, to_dict

log = logging.getLogger(__name__)

# Parts that `model.freeze` can name -> top-level paths in the DeepseekOCR parameter tree.
FREEZE_PATHS = {
    "sam": (("sam_model",),),
    "clip": (("vision_model",),),
    "projector": (("projector",),),
    "vision": (("sam_model",), ("vision_model",), ("projector",), ("image_newline",), ("view_seperator",)),
    "decoder": (("decoder",),),
    "embeddings": (("decoder", "embed_tokens"),),
    "lm_head": (("decoder", "lm_head"),),
}


def compute_dtype(name: str):
  if name == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  return jnp.dtype(name)


def frozen_filter(freeze: tuple[str, ...]):
  prefixes = [p for name in freeze for p in FREEZE_PATHS[name]]

  def is_frozen(path, value) -> bool:
    keys = tuple(str(k) for k in path)
    return isinstance(value, nnx.Param) and any(keys[:len(p)] == p for p in prefixes)
  return is_frozen


def maybe_initialize_distributed() -> None:
  """Multi-host: `jax.distributed.initialize()` when the environment describes a cluster."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    kwargs = {}
    if env.get("JAX_NUM_PROCESSES"):
      kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if env.get("JAX_PROCESS_ID"):
      kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
  elif env.get("DSOCR_DISTRIBUTED") == "1":  # SLURM, TPU pods...: let JAX detect the cluster
    jax.distributed.initialize()


def build_model(cfg: TrainConfig):
  """(model, ModelConfig, tokenizer path): from `model.init` (load_model) or randomly initialised."""
  from dsocr_jax import config as model_config
  from dsocr_jax.model.ocr import DeepseekOCR
  dtype = compute_dtype(cfg.model.compute_dtype)
  tokenizer = cfg.tokenizer
  if cfg.model.init is not None:
    from dsocr_jax.checkpoint.load import load_model
    loaded = load_model(cfg.model.init, dtype=dtype, param_dtype=jnp.float32)
    tokenizer = tokenizer or loaded.tokenizer_path
    model, mcfg = loaded.model, loaded.config
  else:
    mcfg = (model_config.load_config(cfg.model.config) if cfg.model.config
            else model_config.preset(cfg.model.preset))
    model = DeepseekOCR(mcfg, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(cfg.seed))
  if tokenizer is None:
    raise ValueError("config: tokenizer: no tokenizer.json given and the init checkpoint has none")
  return model, mcfg, tokenizer


@dataclasses.dataclass
class TrainState:
  trainable: dict
  frozen: dict
  rest: list
  opt_state: optax.OptState
  step: int
  rng: jax.Array  # uint32 key data; the model has no stochastic layer today, saved so that one would resume


class Trainer:

  def __init__(self, cfg: TrainConfig, workdir: str, *, mesh=None):
    self.cfg, self.workdir = cfg, workdir
    os.makedirs(workdir, exist_ok=True)
    model, self.model_cfg, self.tokenizer_path = build_model(cfg)
    ep = False
    if mesh is not None:
      from dsocr_jax import expert_parallel, sharding
      sharding.shard_module(model, mesh)
      if mesh.shape[sharding.EXPERT] > 1 or cfg.model.capacity_factor is not None:
        expert_parallel.enable_expert_parallel(model, mesh, capacity_factor=cfg.model.capacity_factor)
        ep = True
    self.mesh = mesh
    graphdef, trainable, frozen, rest = nnx.split(model, lambda p, v: isinstance(v, nnx.Param) and not
                                                  frozen_filter(cfg.model.freeze)(p, v),
                                                  nnx.Param, ...)
    dec = self.model_cfg.decoder
    self.mdef = steps.ModelDef(graphdef, jax.tree.structure(trainable), jax.tree.structure(frozen),
                               jax.tree.structure(rest), dec.n_routed_experts, float(dec.aux_loss_alpha), ep)
    self.tx = optim.optimizer(cfg.optim, cfg.steps)
    self.lr_at = optim.schedule(cfg.optim, cfg.steps)
    trainable_d = nnx.to_pure_dict(trainable)
    self.state = TrainState(trainable_d, nnx.to_pure_dict(frozen), jax.tree.leaves(rest), self.tx.init(trainable_d),
                            0, jax.random.key_data(jax.random.key(cfg.seed)))
    self._apply = jax.jit(self._apply_update, donate_argnums=(0, 1))
    self.ckpt = Checkpointer(workdir, cfg.checkpoint)
    self.pad_id = data_lib.pad_id_of(self.tokenizer_path)
    from dsocr_jax.text.tokenizer import Tokenizer
    self.tokenizer = Tokenizer.from_file(self.tokenizer_path)
    pi, pc = jax.process_index(), jax.process_count()
    self.train_ds = data_lib.dataset(data_lib.records_for(cfg.data, "train"), cfg.data, self.tokenizer_path,
                                     train=True, process_index=pi, process_count=pc)
    eval_records = data_lib.records_for(cfg.data, "eval")
    self.eval_ds = (data_lib.dataset(eval_records, cfg.data, self.tokenizer_path, train=False, process_index=pi,
                                     process_count=pc) if eval_records else None)
    self.train_iter = iter(self.train_ds)
    self._stop_signal = None
    self.truncated = 0

  # ------------------------------------------------------------------------------------------ state

  def num_params(self) -> tuple[int, int]:
    size = lambda t: int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(t)))
    return size(self.state.trainable), size(self.state.frozen)

  def all_params(self) -> dict:
    """Trainable and frozen parameters as one nested dict (the `params.to_tree(model)` layout)."""
    def merge(a, b):
      out = dict(a)
      for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
      return out
    return merge(self.state.trainable, self.state.frozen)

  def _split_params(self, tree: dict) -> tuple[dict, dict]:
    def pick(template, source):
      return {k: pick(v, source[k]) if isinstance(v, dict) else source[k] for k, v in template.items()}
    return pick(self.state.trainable, tree), pick(self.state.frozen, tree)

  def resume(self) -> bool:
    """Restores the newest readable checkpoint of the workdir; False when there is none."""
    found = self.ckpt.restore(params=self.all_params(), opt_state=self.state.opt_state,
                              train={"step": np.int64(0), "rng": self.state.rng})
    if found is None:
      return False
    step, items = found
    trainable, frozen = self._split_params(items["params"])
    self.state = dataclasses.replace(self.state, trainable=trainable, frozen=frozen,
                                     opt_state=items["opt_state"], step=int(items["train"]["step"]),
                                     rng=items["train"]["rng"])
    self.train_iter = data_lib.iterate(self.train_ds, items["data"]["iterator"])
    log.info("resumed from step %d in %s", step, self.ckpt.directory)
    return True

  def save(self, force: bool = False) -> None:
    s = self.state
    self.ckpt.save(s.step, params=self.all_params(), opt_state=s.opt_state,
                   train={"step": np.int64(s.step), "rng": s.rng},
                   data={"iterator": self.train_iter.get_state()},
                   meta={"step": s.step, "config": to_dict(self.cfg)}, force=force)

  # ------------------------------------------------------------------------------------------ one step

  def _apply_update(self, trainable, opt_state, grads):
    updates, opt_state = self.tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, optax.tree.norm(grads)

  def _next_batch(self) -> data_lib.Batch:
    batch = next(self.train_iter)
    self.truncated += batch.truncated
    return batch

  def _device_arrays(self, batch: data_lib.Batch) -> dict:
    if self.mesh is None:
      return batch.arrays
    from dsocr_jax import sharding
    if jax.process_count() == 1:
      return sharding.shard_batch(self.mesh, batch.arrays)
    # Multi-process: each process holds its own rows; together they form the global batch.
    def put(a):
      spec = sharding.activation_sharding(self.mesh, ("batch",) + (None,) * (np.ndim(a) - 1))
      return jax.make_array_from_process_local_data(spec, np.asarray(a))
    return jax.tree.map(put, batch.arrays)

  def train_step(self) -> dict:
    """One optimizer step over `grad_accum` micro-batches; returns its metrics."""
    t0 = time.perf_counter()
    micro = [self._next_batch() for _ in range(self.cfg.optim.grad_accum)]
    total_tokens = max(1, sum(b.num_loss_tokens for b in micro))
    s = self.state
    grads, figures = None, []
    for b in micro:
      g, f = steps.grad_step(self.mdef, s.trainable, s.frozen, s.rest, self._device_arrays(b),
                             jnp.float32(1.0 / total_tokens), jnp.float32(1.0 / len(micro)), layout=b.layout)
      grads = g if grads is None else steps.add_trees(grads, g)
      figures.append(f)
    lr = float(self.lr_at(s.step))
    trainable, opt_state, grad_norm = self._apply(s.trainable, s.opt_state, grads)
    self.state = dataclasses.replace(s, trainable=trainable, opt_state=opt_state, step=s.step + 1)
    figures = jax.device_get(figures)
    step_time = time.perf_counter() - t0
    ce = sum(float(f["ce_sum"]) for f in figures) / total_tokens
    aux = sum(float(f["aux"]) for f in figures) / len(figures)
    seq_tokens = sum(int(np.sum(b.arrays["valid"])) for b in micro)
    return {"step": self.state.step, "loss": ce, "aux_loss": aux, "total_loss": ce + aux, "lr": lr,
            "grad_norm": float(grad_norm), "tokens_per_s": seq_tokens / step_time,
            "answer_tokens": total_tokens, "step_time_s": step_time,
            "dropped_tokens": int(sum(int(f["dropped"]) for f in figures)), "truncated_examples": self.truncated}

  # ------------------------------------------------------------------------------------------ eval

  def evaluate(self) -> dict:
    """Held-out loss and the character error rate of greedy decoding, over `eval.batches` batches."""
    if self.eval_ds is None or self.cfg.eval.batches == 0:
      return {}
    s = self.state
    ce_total = count_total = 0.0
    refs, hyps = [], []
    for i, b in enumerate(iter(self.eval_ds)):
      if i >= self.cfg.eval.batches:
        break
      arrays = self._device_arrays(b)
      ce_sum, count, _ = steps.eval_step(self.mdef, s.trainable, s.frozen, s.rest, arrays, layout=b.layout)
      ce_total, count_total = ce_total + float(ce_sum), count_total + float(count)
      out = steps.greedy_decode(self.mdef, s.trainable, s.frozen, s.rest, arrays, jnp.asarray(b.prompt_lens),
                                layout=b.layout, max_new=self.cfg.eval.max_new_tokens,
                                eos_id=self.tokenizer.eos_id, pad_id=self.pad_id)
      for row, ref in zip(np.asarray(out), b.answers):
        ids = [int(t) for t in row]
        ids = ids[:ids.index(self.tokenizer.eos_id)] if self.tokenizer.eos_id in ids else ids
        hyps.append(self.tokenizer.decode(ids, skip_special_tokens=True))
        refs.append(ref)
    return {"step": s.step, "eval_loss": ce_total / max(count_total, 1.0), "eval_cer": cer(refs, hyps),
            "eval_examples": len(refs), "eval_sample": hyps[0] if hyps else ""}

  # ------------------------------------------------------------------------------------------ run

  def _on_sigterm(self, signum, frame):
    self._stop_signal = signum

  def run(self, stop_at: int) -> list[dict]:
    """Trains until global step `stop_at` (or SIGTERM), saving as configured; returns this run's metrics."""
    cfg = self.cfg
    previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    metrics_path = os.path.join(self.workdir, "metrics.jsonl")
    history = []
    bar = _progress(self.state.step, stop_at)
    try:
      with open(metrics_path, "a") as metrics_file:
        def emit(record):
          if jax.process_index() == 0:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
          history.append(record)
        while self.state.step < stop_at and self._stop_signal is None:
          m = self.train_step()
          emit(m)
          if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}")
          elif m["step"] % cfg.log_every == 0:
            log.info("step %d loss %.4f aux %.4f lr %.3e grad_norm %.3f %.0f tok/s", m["step"], m["loss"],
                     m["aux_loss"], m["lr"], m["grad_norm"], m["tokens_per_s"])
          if cfg.eval.every and m["step"] % cfg.eval.every == 0 and m["step"] < stop_at:
            emit(self.evaluate())
          if m["step"] % cfg.checkpoint.every == 0:
            self.save()
        if self._stop_signal is not None:
          log.warning("SIGTERM: saving step %d before exiting", self.state.step)
        elif self.state.step >= stop_at and history:
          final = self.evaluate()
          if final:
            emit(final)
            log.info("eval at step %d: loss %.4f cer %.4f", final["step"], final["eval_loss"], final["eval_cer"])
      self.save(force=True)
      self.ckpt.wait()
    finally:
      signal.signal(signal.SIGTERM, previous)
      if bar is not None:
        bar.close()
    return history

  def close(self) -> None:
    self.ckpt.close()
    close = getattr(self.train_iter, "close", None)
    if close is not None:
      close()


def _progress(start: int, stop: int):
  if not sys.stderr.isatty() or stop <= start:
    return None
  from tqdm import tqdm
  return tqdm(total=stop, initial=start, unit="step", dynamic_ncols=True)


def train(cfg: TrainConfig, workdir: str, *, stop_at: int | None = None, mesh=None) -> list[dict]:
  """Resumes from the workdir's newest checkpoint if any, then trains until `stop_at` (default cfg.steps)."""
  trainer = Trainer(cfg, workdir, mesh=mesh)
  try:
    trainer.resume()
    return trainer.run(cfg.steps if stop_at is None else stop_at)
  finally:
    trainer.close()

