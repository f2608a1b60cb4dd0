"""One process of the 2-process test (tests/test_multiprocess.py): 4 CPU devices here, 8 in the job.

usage: multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT MESH_SPEC OUT_NPZ

Runs the golden decoder over the global mesh: a forward pass and one SGD step on the next-token loss.
Process 0 writes the gathered logits, loss and updated parameters to OUT_NPZ (written to a temporary name
and renamed, so a half-written file is never read).
"""

import os
import sys

import jax

LOCAL_DEVICES = 4
LEARNING_RATE = 0.5
NUM_CASES = 2


def main(process_id: int, num_processes: int, port: int, spec: str, out_path: str) -> None:
  jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on CPU
  jax.config.update("jax_default_matmul_precision", "highest")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                             process_id=process_id, initialization_timeout=60)
  import numpy as np
  from flax import nnx
  from jax.experimental import multihost_utils

  from dsocr_jax import sharding
  from sharding_common import case_paths, make_decoder, padded_batch, sgd_step

  assert jax.device_count() == LOCAL_DEVICES * num_processes, jax.devices()
  mesh = sharding.parse_mesh(spec)
  model = sharding.distribute(make_decoder(), mesh, impl="ragged")  # differentiable on CPU
  embeds, ids, lengths = (sharding.shard_batch(mesh, a) for a in padded_batch(case_paths()[:NUM_CASES])[:3])
  loss, logits = sgd_step(model, embeds, ids, lengths, LEARNING_RATE)
  gather = lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True))
  result = {"loss": gather(loss), "logits": gather(logits)}
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    result["param/" + "/".join(map(str, path))] = gather(v.get_value())
  if process_id == 0:
    tmp = out_path + ".tmp.npz"
    np.savez(tmp, **result)
    os.replace(tmp, out_path)
  jax.distributed.shutdown()


if __name__ == "__main__":
  pid, nproc, port, spec, out = sys.argv[1:6]
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  main(int(pid), int(nproc), int(port), spec, out)
