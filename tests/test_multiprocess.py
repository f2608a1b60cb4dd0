"""Two processes x 4 CPU devices (jax.distributed, gloo collectives) == one process on one device.

The workers (tests/multiprocess_worker.py) shard the golden decoder over an 8-device mesh spanning both
processes, run a forward pass and one SGD step; process 0 writes the gathered results. Here we compute the
same step on one device and compare. Tolerances (float32, highest precision): loss and logits max abs error
<= 1e-5 * max(1, max|ref|); every updated parameter max abs error <= 1e-5 * max(1, max|ref|).

Bounded: each worker has a wall-clock limit, and every started process is killed (by its own pid) on the way
out whatever happens.
"""

import os
import socket
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sharding_common import case_paths, make_trainable_decoder, padded_batch, sgd_step

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "multiprocess_worker.py")
TIMEOUT_S = 240
LEARNING_RATE = 0.5  # multiprocess_worker.LEARNING_RATE
NUM_CASES = 2  # multiprocess_worker.NUM_CASES


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_workers(spec: str, out_path: str) -> None:
  port = _free_port()
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the worker sets its device count through jax.config
  env["PYTHONPATH"] = os.pathsep.join([HERE, os.path.dirname(HERE), env.get("PYTHONPATH", "")])
  logs = [open(out_path + f".log{i}", "w+") for i in range(2)]
  procs = []
  try:
    for i in range(2):
      procs.append(subprocess.Popen([sys.executable, WORKER, str(i), "2", str(port), spec, out_path],
                                    stdout=logs[i], stderr=subprocess.STDOUT, env=env))
    for p in procs:
      p.wait(timeout=TIMEOUT_S)
    codes = [p.returncode for p in procs]
    if codes != [0, 0]:
      pytest.fail(f"worker exit codes {codes}:\n{_tails(logs)}")
  except subprocess.TimeoutExpired:
    pytest.fail(f"workers did not finish within {TIMEOUT_S} s:\n{_tails(logs)}")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for f in logs:
      f.close()


def _tails(logs) -> str:
  out = []
  for i, f in enumerate(logs):
    f.flush()
    f.seek(0)
    out.append(f"--- process {i} ---\n" + f.read()[-3000:])
  return "\n".join(out)


def _close(got, ref, what):
  err = np.abs(np.asarray(got) - np.asarray(ref)).max()
  assert err <= 1e-5 * max(1.0, float(np.abs(ref).max())), f"{what}: max abs error {err}"


# expert=8 spans both processes: cross-process all-to-all and gradient all-reduce. The second layout keeps the
# all-to-all inside each process and puts data parallelism across them (slow: another pair of compiles).
@pytest.mark.parametrize("spec", ["expert=8", pytest.param("data=2,expert=4", marks=pytest.mark.slow)])
def test_two_processes_match_single_process(spec, tmp_path):
  out_path = str(tmp_path / "result.npz")
  _run_workers(spec, out_path)
  got = np.load(out_path)

  model = make_trainable_decoder()
  embeds, ids, lengths, _ = padded_batch(case_paths()[:NUM_CASES])
  loss, logits = sgd_step(model, jnp.asarray(embeds), jnp.asarray(ids), jnp.asarray(lengths), LEARNING_RATE)
  _close(got["loss"], loss, "loss")
  _close(got["logits"], logits, "logits")
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  assert len(flat) == sum(k.startswith("param/") for k in got.files)
  for path, v in flat:
    _close(got["param/" + "/".join(map(str, path))], v.get_value(), "updated " + ".".join(map(str, path)))
