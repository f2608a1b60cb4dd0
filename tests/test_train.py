"""Training end to end on the tiny model and synthetic data: learning, exact resume, freezing."""

import logging
import os
import shutil

import jax
import numpy as np
import pytest

from train import config as config_lib
from train import loop

from conftest import GOLDEN_DIR

# Small and fast: 128 px views (2x2 feature grid, 7 image tokens), batches of 4, a tiny fixed dataset.
BASE = [f"tokenizer={os.path.join(GOLDEN_DIR, 'tokenizer.json')}", "data.image_size=128", "data.batch_size=4",
        "data.buckets=[40]", "data.synthetic.train_examples=32", "data.synthetic.eval_examples=4",
        "data.synthetic.max_chars=6", "optim.lr=3e-3", "optim.warmup_steps=2", "steps=12",
        "checkpoint.every=3", "checkpoint.keep=5", "checkpoint.async_save=true", "eval.batches=1",
        "eval.max_new_tokens=8"]


def _cfg(*extra):
  return config_lib.load(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_cpu.yaml"),
                         BASE + list(extra))


def _losses(history):
  return {m["step"]: m["loss"] for m in history if "loss" in m}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  return workdir, loop.train(_cfg(), workdir, stop_at=12)


def test_loss_falls_and_metrics_are_logged(straight_run):
  workdir, history = straight_run
  losses = _losses(history)
  assert sorted(losses) == list(range(1, 13))
  first, last = np.mean([losses[s] for s in range(1, 4)]), np.mean([losses[s] for s in range(10, 13)])
  assert last < first - 1.0, (first, last)  # from ~ln(1024) = 6.9 towards the byte statistics of the answers
  lines = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
  import json
  records = [json.loads(line) for line in lines]
  for key in ("step", "loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"):
    assert key in records[0]
  assert records[0]["aux_loss"] > 0  # tiny preset has MoE layers
  final = records[-1]
  assert "eval_loss" in final and 0.0 <= final["eval_cer"]


def test_resume_is_exact_and_falls_back_from_an_unreadable_checkpoint(straight_run, tmp_path, caplog):
  _, history = straight_run
  reference = _losses(history)
  workdir = str(tmp_path)
  no_eval = "eval.batches=0"
  first = _losses(loop.train(_cfg(no_eval), workdir, stop_at=6))
  second = _losses(loop.train(_cfg(no_eval), workdir, stop_at=9))  # resumes from step 6
  assert sorted(second) == list(range(7, 10))
  for step, value in {**first, **second}.items():
    assert abs(value - reference[step]) <= 1e-5, (step, value, reference[step])
  # Break the newest checkpoint (9): the next run warns and resumes from 6, and still matches.
  params_dir = os.path.join(workdir, "checkpoints", "9", "params")
  shutil.rmtree(params_dir)
  with caplog.at_level(logging.WARNING):
    third = _losses(loop.train(_cfg(no_eval), workdir, stop_at=12))
  assert "cannot restore step 9" in caplog.text
  assert sorted(third) == list(range(7, 13))
  for step, value in third.items():
    assert abs(value - reference[step]) <= 1e-5, (step, value, reference[step])


def test_frozen_parts_do_not_change(tmp_path):
  trainer = loop.Trainer(_cfg("model.freeze=[sam,clip]"), str(tmp_path))
  try:
    before = jax.tree.map(np.asarray, trainer.all_params())
    assert "sam_model" in trainer.state.frozen and "sam_model" not in trainer.state.trainable
    for _ in range(2):
      trainer.train_step()
    after = jax.tree.map(np.asarray, trainer.all_params())
  finally:
    trainer.close()
  for part in ("sam_model", "vision_model"):
    jax.tree.map(np.testing.assert_array_equal, before[part], after[part])
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), before["decoder"], after["decoder"]))
  assert all(changed)  # every decoder parameter moved (AdamW updates every leaf with a gradient)
