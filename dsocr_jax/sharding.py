"""The device mesh and the logical-axis rules: the only place that knows mesh axis names.

Mesh. Always four axes, in this order (slowest to fastest varying over the device list, so the outer axes span
hosts and slices and the inner ones stay on the fast local links):

* `data`   pure data parallelism: a full replica of the parameters per group;
* `fsdp`   data parallelism with the parameters (and optimizer state) sharded over their `embed` dimension;
* `expert` routed experts split over devices (tokens travel to their experts by all-to-all, see
           `dsocr_jax.expert_parallel`); outside the MoE blocks this axis also carries batch;
* `tensor` Megatron-style splits of `mlp`, `heads`, `vocab`.

`parse_mesh("data=2,expert=4")` builds it; omitted axes have size 1, one axis may be `-1` (the remaining
devices), and an empty spec (or None) puts every device on `data` (pure data parallelism: the layout that
needs no divisibility and no collectives in the forward pass). One device is the mesh of size 1.

Rules. Modules name logical axes on their parameters (`logical_axes` metadata, `dsocr_jax.model.layers.param`)
and activations; `DEFAULT_RULES` / `ACTIVATION_RULES` map each name to a tuple of mesh axes. A dimension whose
size is not divisible by the product of its mesh axes drops mesh axes from the end of that tuple until it is
(down to replicated), and a mesh axis is used at most once per array (a later dimension asking for an axis
already used stays replicated on it). Unknown logical names are an error listing every one of them.
"""

from __future__ import annotations

import argparse
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, FSDP, EXPERT, TENSOR = "data", "fsdp", "expert", "tensor"
MESH_AXES = (DATA, FSDP, EXPERT, TENSOR)
# Tokens inside the expert-parallel block: every device holds distinct tokens.
TOKEN_AXES = MESH_AXES

MeshAxes = tuple[str, ...]
Rules = Mapping[str, MeshAxes]

# Parameters. Vision names (SAM convolutions, position tables) are replicated: the encoder is small (0.4 B) and
# compute-bound, so data parallelism is its layout.
DEFAULT_RULES: dict[str, MeshAxes] = {
    "embed": (FSDP,),
    "vocab": (TENSOR,),
    "mlp": (TENSOR,),
    "moe_mlp": (TENSOR,),
    "heads": (TENSOR,),
    "kv_heads": (TENSOR,),
    "expert": (EXPERT,),
    "norm": (),
    "conv_in": (),
    "conv_out": (),
    "kernel_h": (),
    "kernel_w": (),
    "pos": (),
    "rel_pos": (),
    "head_dim": (),
}

# Activations: batch is data-parallel over every axis that does not split the feature dimensions.
ACTIVATION_RULES: dict[str, MeshAxes] = {
    "batch": (DATA, FSDP, EXPERT),
    "length": (),
    "embed": (),
    "heads": (TENSOR,),
    "kv_heads": (TENSOR,),
    "mlp": (TENSOR,),
    "vocab": (TENSOR,),
}


# --------------------------------------------------------------------------------------------------- the mesh

def parse_mesh_shape(spec: str | None, num_devices: int) -> dict[str, int]:
  """`"data=2,expert=-1"` -> {"data": 2, "fsdp": 1, "expert": n/2, "tensor": 1}; ValueError naming the problem."""
  if num_devices < 1:
    raise ValueError("mesh: no devices")
  shape = {a: 1 for a in MESH_AXES}
  if spec is None or not spec.strip():
    shape[DATA] = num_devices
    return shape
  seen, fill = set(), None
  for item in spec.split(","):
    item = item.strip()
    name, eq, value = item.partition("=")
    name, value = name.strip(), value.strip()
    if not eq or not name or not value:
      raise ValueError(f"mesh: {item!r} is not AXIS=SIZE (spec {spec!r})")
    if name not in MESH_AXES:
      raise ValueError(f"mesh: unknown axis {name!r} (axes are {', '.join(MESH_AXES)})")
    if name in seen:
      raise ValueError(f"mesh: axis {name!r} given twice")
    seen.add(name)
    try:
      size = int(value)
    except ValueError:
      raise ValueError(f"mesh: size of {name!r} is not an integer: {value!r}") from None
    if size == -1:
      if fill is not None:
        raise ValueError(f"mesh: only one axis may be -1 (got {fill!r} and {name!r})")
      fill = name
    elif size < 1:
      raise ValueError(f"mesh: size of {name!r} must be >= 1 or -1, got {size}")
    else:
      shape[name] = size
  fixed = math.prod(shape.values())
  if fill is not None:
    if num_devices % fixed:
      raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes' product {fixed} "
                       f"(spec {spec!r})")
    shape[fill] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f"mesh: spec {spec!r} needs {fixed} devices, {num_devices} available "
                     f"(use -1 on one axis to fill the rest)")
  return shape


def parse_mesh(spec: str | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The four-axis mesh described by `spec` over `devices` (default: every device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = parse_mesh_shape(spec, len(devices))
  dims = tuple(shape[a] for a in MESH_AXES)
  if devices[0].platform == "tpu":  # topology-aware order over the ICI torus; its errors are real errors
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(dims, devices)
  else:  # CPU / GPU: no topology to respect, a plain reshape
    grid = np.array(devices, dtype=object).reshape(dims)
  return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def mesh_description(mesh: Mesh) -> str:
  return ",".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES)


# --------------------------------------------------------------------------------------------------- the rules

def _check_names(names, rules: Rules, where: str = "") -> None:
  unknown = sorted({n for n in names if n is not None and n not in rules})
  if unknown:
    raise ValueError(f"sharding: no rule for logical axis name(s) {', '.join(map(repr, unknown))}{where} "
                     f"(known: {', '.join(sorted(rules))}); add them to the rules")


def logical_to_mesh(axes: Sequence[str | None], rules: Rules = DEFAULT_RULES, *, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
  """Logical axis names -> PartitionSpec of mesh axes.

  With `mesh`, axes of size 1 are left out; with `mesh` and `shape`, a dimension keeps only the leading mesh
  axes of its rule whose size product divides it.
  """
  _check_names(axes, rules)
  if shape is not None and len(shape) != len(axes):
    raise ValueError(f"sharding: {len(axes)} logical axes {tuple(axes)} for a shape of rank {len(shape)}")
  used: set[str] = set()
  out = []
  for i, name in enumerate(axes):
    wanted = [a for a in (rules[name] if name is not None else ()) if a not in used]
    if mesh is not None:
      wanted = [a for a in wanted if mesh.shape[a] > 1]
      if shape is not None:
        while wanted and shape[i] % math.prod(mesh.shape[a] for a in wanted):
          wanted.pop()
    used.update(wanted)
    out.append(None if not wanted else wanted[0] if len(wanted) == 1 else tuple(wanted))
  while out and out[-1] is None:
    out.pop()
  return PartitionSpec(*out)


def _variables(module_or_state):
  state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.state(module_or_state)
  return state, nnx.to_flat_state(state)


def param_shardings(module_or_state, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
  """A State shaped like `nnx.state(module)` whose leaves are NamedShardings.

  Variables without `logical_axes` (FP8 block scales, counters) are replicated, except FP8 scales of
  expert-stacked kernels, which follow their kernel's leading `expert` split so that each device holds the
  scales of its own experts.
  """
  state, flat = _variables(module_or_state)
  names = {n for _, v in flat for n in (v.get_metadata().get("logical_axes") or ())}
  _check_names(names, rules, " in the parameters")
  by_path = {path: v for path, v in flat}
  specs = []
  for path, v in flat:
    axes = v.get_metadata().get("logical_axes")
    shape = np.shape(v.get_value())
    if axes is None:
      kernel = by_path.get(path[:-1] + (str(path[-1]).removesuffix("_scale"),)) if str(path[-1]).endswith(
          "_scale") else None
      kernel_axes = kernel.get_metadata().get("logical_axes") if kernel is not None else None
      if kernel_axes and kernel_axes[0] == "expert" and len(shape) == len(kernel_axes):
        axes = ("expert",) + (None,) * (len(shape) - 1)
      else:
        axes = (None,) * len(shape)
    specs.append((path, NamedSharding(mesh, logical_to_mesh(axes, rules, mesh=mesh, shape=shape))))
  return nnx.from_flat_state(specs)


def _put(x, sharding: NamedSharding):
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  # Multi-process: every process holds the same full value; each builds its own shards from it.
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_state(state: nnx.State, shardings: nnx.State) -> nnx.State:
  values = nnx.to_flat_state(state)
  targets = dict(nnx.to_flat_state(shardings))
  out = []
  for path, v in values:
    out.append((path, v.replace(_put(v.get_value(), targets[path]))))
  return nnx.from_flat_state(out)


def shard_module(module: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
  """Places every variable of `module` on `mesh` by the rules (in place); returns the module."""
  state = nnx.state(module)
  nnx.update(module, shard_state(state, param_shardings(state, mesh, rules)))
  return module


def activation_sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int] | None = None,
                        rules: Rules = ACTIVATION_RULES) -> NamedSharding:
  """e.g. `activation_sharding(mesh, ("batch", "length", "embed"), x.shape)` for decoder inputs."""
  return NamedSharding(mesh, logical_to_mesh(axes, rules, mesh=mesh, shape=shape))


def shard_batch(mesh: Mesh, x):
  """Puts an array (or pytree of arrays) whose leading dimension is batch on the mesh, data-parallel."""
  def put(a):
    axes = ("batch",) + (None,) * (np.ndim(a) - 1)
    return _put(a, activation_sharding(mesh, axes, np.shape(a)))
  return jax.tree.map(put, x)


def per_device_bytes(x: jax.Array) -> dict[jax.Device, int]:
  """Bytes of `x` held by each addressable device."""
  return {s.device: s.data.nbytes for s in x.addressable_shards}


# --------------------------------------------------------------------------------------------------- entry points

def distribute(model: nnx.Module, mesh: Mesh, *, capacity_factor: float | None = None, impl: str | None = None,
               rules: Rules = DEFAULT_RULES) -> nnx.Module:
  """Shards the parameters and, where the mesh has an `expert` axis, turns on expert parallelism.

  `impl` picks the local grouped FFN ('segments' | 'ragged', default per backend); both are differentiable.
  """
  from dsocr_jax import expert_parallel
  shard_module(model, mesh, rules)
  if mesh.shape[EXPERT] > 1 or capacity_factor is not None:
    expert_parallel.enable_expert_parallel(model, mesh, capacity_factor=capacity_factor, impl=impl)
  return model


def add_mesh_argument(parser: argparse.ArgumentParser, default: str = "") -> None:
  parser.add_argument(
      "--mesh", default=default, metavar="SPEC",
      help="device mesh, e.g. 'data=2,expert=4' (axes: " + ", ".join(MESH_AXES) + "; omitted axes are 1, "
      "one axis may be -1 = the remaining devices; empty = every device on data)")


def mesh_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> Mesh:
  """The mesh of `--mesh`; a bad spec ends the program with one readable line (exit code 2)."""
  try:
    return parse_mesh(args.mesh)
  except ValueError as e:
    if parser is not None:
      parser.error(str(e))
    raise SystemExit(f"error: {e}") from None
