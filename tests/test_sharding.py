"""Mesh specs, logical-axis rules and, in a subprocess with 8 simulated CPU devices, the sharded decoder.

The 8-device checks live in tests/sharding_cases.py: XLA fixes the CPU device count when jax starts, and
conftest has already started it here with one device.
"""

import argparse
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dsocr_jax import expert_parallel, sharding
from sharding_common import make_decoder

HERE = os.path.dirname(os.path.abspath(__file__))
EIGHT_DEVICE_TIMEOUT_S = 600


@pytest.mark.parametrize("spec,devices,want", [
    ("data=2,expert=4", 8, (2, 1, 4, 1)),
    ("expert=8", 8, (1, 1, 8, 1)),
    (" data = 2 , fsdp=2,expert=-1 ", 8, (2, 2, 2, 1)),
    ("tensor=-1", 4, (1, 1, 1, 4)),
    ("", 8, (8, 1, 1, 1)),
    (None, 3, (3, 1, 1, 1)),
    ("data=1", 1, (1, 1, 1, 1)),
])
def test_parse_mesh_shape(spec, devices, want):
  shape = sharding.parse_mesh_shape(spec, devices)
  assert tuple(shape[a] for a in sharding.MESH_AXES) == want


@pytest.mark.parametrize("spec,message", [
    ("data=2,expert=3", "needs 6 devices, 8 available"),
    ("model=8", "unknown axis 'model'"),
    ("data=2,data=4", "axis 'data' given twice"),
    ("data", "'data' is not AXIS=SIZE"),
    ("data=two", "size of 'data' is not an integer"),
    ("data=0,expert=-1", "size of 'data' must be >= 1 or -1"),
    ("data=-1,expert=-1", "only one axis may be -1"),
    ("data=3,expert=-1", "not divisible by the fixed axes' product 3"),
])
def test_parse_mesh_shape_errors_name_the_problem(spec, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    sharding.parse_mesh_shape(spec, 8)


def test_one_device_is_the_mesh_of_size_one():
  mesh = sharding.parse_mesh("")
  assert mesh.axis_names == sharding.MESH_AXES and mesh.size == jax.device_count()
  with pytest.raises(ValueError, match="needs 2 devices"):
    sharding.parse_mesh("expert=2", devices=jax.devices()[:1])


class FakeMesh:
  """logical_to_mesh only reads `.shape`: this lets the rules be checked for 8 devices in a 1-device process."""
  def __init__(self, **sizes):
    self.shape = {a: sizes.get(a, 1) for a in sharding.MESH_AXES}


def test_logical_to_mesh_rules_and_divisibility():
  mesh = FakeMesh(data=2, fsdp=2, expert=2, tensor=2)
  rules = sharding.DEFAULT_RULES
  assert sharding.logical_to_mesh(("expert", "embed", "moe_mlp"), rules, mesh=mesh, shape=(64, 1280, 896)) == \
      P("expert", "fsdp", "tensor")
  # 129280 = 2^7 * 1010: divisible by 2, so the vocab keeps `tensor`; 3 is not, so that dimension is replicated.
  assert sharding.logical_to_mesh(("vocab", "embed"), rules, mesh=mesh, shape=(129280, 3)) == P("tensor")
  # Axes of size 1 drop out; trailing replicated dimensions are omitted.
  assert sharding.logical_to_mesh(("embed", "mlp"), rules, mesh=FakeMesh(expert=8), shape=(64, 128)) == P()
  # Without a mesh the rule itself is returned.
  assert sharding.logical_to_mesh(("embed", None, "heads"), rules) == P("fsdp", None, "tensor")
  # Batch over every data-like axis; a batch of 4 on data=2 x fsdp=2 x expert=2 keeps the first two.
  act = sharding.ACTIVATION_RULES
  assert sharding.logical_to_mesh(("batch", "length", "embed"), act, mesh=mesh, shape=(8, 16, 64)) == \
      P(("data", "fsdp", "expert"))
  assert sharding.logical_to_mesh(("batch", "length"), act, mesh=mesh, shape=(4, 16)) == P(("data", "fsdp"))


def test_a_mesh_axis_is_used_once_per_array():
  rules = {"a": ("tensor",), "b": ("tensor", "fsdp")}
  assert sharding.logical_to_mesh(("a", "b"), rules, mesh=FakeMesh(tensor=2, fsdp=2), shape=(4, 4)) == \
      P("tensor", "fsdp")


def test_unknown_logical_names_are_listed():
  with pytest.raises(ValueError, match="no rule for logical axis name.*'bar', 'foo'"):
    sharding.logical_to_mesh(("foo", "embed", "bar"))


def test_every_decoder_parameter_has_a_rule_and_shards_on_one_device():
  model = make_decoder()
  mesh = sharding.parse_mesh("")
  shardings = sharding.param_shardings(model, mesh)
  assert all(s.is_fully_replicated for s in jax.tree.leaves(shardings))
  sharding.shard_module(model, mesh)
  assert model.layers[1].mlp.experts.gate_proj[...].sharding.mesh == mesh
  # The rules cover every name the decoder uses.
  from flax import nnx
  names = {n for _, v in nnx.to_flat_state(nnx.state(model)) for n in v.get_metadata().get("logical_axes") or ()}
  assert names - {None} <= set(sharding.DEFAULT_RULES)


def test_param_shardings_reports_unknown_names():
  with pytest.raises(ValueError, match="'vocab'.*in the parameters"):
    sharding.param_shardings(make_decoder(), sharding.parse_mesh(""), rules={"embed": ("fsdp",)})


def test_mesh_argument_for_the_clis(capsys):
  parser = argparse.ArgumentParser(prog="tool")
  sharding.add_mesh_argument(parser)
  mesh = sharding.mesh_from_args(parser.parse_args([]), parser)
  assert mesh.shape["data"] == jax.device_count()
  with pytest.raises(SystemExit) as exit_info:
    sharding.mesh_from_args(parser.parse_args(["--mesh", "expert=3,data=x"]), parser)
  assert exit_info.value.code == 2
  assert "mesh: size of 'data' is not an integer" in capsys.readouterr().err


def test_expert_count_must_divide_over_the_expert_axis():
  with pytest.raises(ValueError, match="8 routed experts cannot be split over expert=3"):
    expert_parallel.ExpertParallelDispatch(FakeMesh(expert=3), 8)
  with pytest.raises(ValueError, match="capacity_factor must be > 0"):
    expert_parallel.ExpertParallelDispatch(FakeMesh(expert=2), 8, capacity_factor=0.0)


def test_all_to_all_volume_hand_worked():
  # 4096 tokens on 8 devices: 512 local, k=6 -> 3072 rows; H=1280 f32. Dropless block = 3072 rows, buffer
  # 8 x 3072 rows; both all-to-alls move 7/8 of it: 2 * 8 * 3072 * 1280 * 4 * 7/8 = 220,200,960 bytes.
  v = expert_parallel.all_to_all_bytes(4096, 1280, 6, 64, 8, 8, 4)
  assert v["send_buffer_rows"] == 8 * 3072
  assert v["buffer_bytes"] == 220_200_960
  assert v["useful_bytes"] == 2 * 3072 * 1280 * 4 * 7 // 8
  # capacity 1.25: per (device, expert) ceil(1.25 * 3072 / 64) = 60 rows, block 8 * 60 = 480 rows.
  c = expert_parallel.all_to_all_bytes(4096, 1280, 6, 64, 8, 8, 4, capacity_factor=1.25)
  assert c["send_buffer_rows"] == 8 * 480


def test_golden_sharded_decoder_on_eight_simulated_devices():
  """Runs tests/sharding_cases.py (logits, greedy tokens, gradients, placement, capacity) on 8 CPU devices."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "sharding_cases.py"]
  proc = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=EIGHT_DEVICE_TIMEOUT_S)
  tail = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if "[SPMD]" not in line)[-6000:]
  assert proc.returncode == 0, tail
  summary = re.search(r"(\d+) passed", proc.stdout)
  assert summary and not re.search(r"\d+ (failed|skipped|error)", proc.stdout), tail
  assert int(summary.group(1)) >= 15, tail
