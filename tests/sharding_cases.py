"""Sharded decoder == single-device decoder on 8 simulated CPU devices (run by tests/test_sharding.py).

Not collected by a plain `pytest` (the name has no test_ prefix): XLA's device count is fixed when jax starts,
so test_sharding.py runs this file in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8.

All golden cases go through as one padded batch (one compile per mesh). Tolerances (float32, highest matmul
precision): logits max abs error <= 1e-5 * max(1, max|ref|) against the single-device run (and the golden
logits within the decoder's own golden tolerance 1e-4 * max(1, max|ref|)); greedy tokens identical to the
golden continuation; gradients per parameter max abs error <= 1e-4 * max|ref grad| + 1e-9.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import case_id, golden_cases
from dsocr_jax import expert_parallel, sharding
from dsocr_jax.generate import kv_cache
from sharding_common import loss_grads, make_decoder, make_trainable_decoder, padded_batch

MESHES = ["expert=8", "data=2,expert=4", "data=2,fsdp=2,expert=2"]
GEN_STEPS = 32
NUM_EXPERTS = 8  # the golden decoder: 8 routed experts, top-2


def test_eight_devices():
  assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"


@functools.cache
def golden_batch():
  """Every golden case in one padded batch: embeds, ids, lengths (device arrays), [(name, case arrays)]."""
  embeds, ids, lengths, cases = padded_batch(golden_cases())
  names = [case_id(p) for p in golden_cases()]
  return jnp.asarray(embeds), jnp.asarray(ids), jnp.asarray(lengths), list(zip(names, cases))


@nnx.jit
def forward_logits(model, embeds):
  positions = jnp.broadcast_to(jnp.arange(embeds.shape[1]), embeds.shape[:2])
  return model(embeds, positions).logits


@nnx.jit
def _prefill(model, embeds, lengths, cache):
  positions = jnp.broadcast_to(jnp.arange(embeds.shape[1]), embeds.shape[:2])
  out = model(embeds, positions, cache=cache, logits_at=lengths - 1)
  return jnp.argmax(out.logits[:, 0], axis=-1).astype(jnp.int32), out.cache


@nnx.jit
def _decode_step(model, tokens, positions, cache):
  out = model(model.embed(tokens[:, None]), positions[:, None], cache=cache)
  return jnp.argmax(out.logits[:, 0], axis=-1).astype(jnp.int32), out.cache


def greedy(model, embeds, lengths, steps=GEN_STEPS) -> np.ndarray:
  cfg = model.cfg
  b, t, _ = embeds.shape
  cache = kv_cache.init_cache(cfg, b, t + steps, jnp.float32)
  tok, cache = _prefill(model, embeds, lengths, cache)
  out = [tok]
  for i in range(steps - 1):
    tok, cache = _decode_step(model, tok, lengths + i, cache)
    out.append(tok)
  return np.stack([np.asarray(x) for x in out], axis=1)


@functools.cache
def reference():
  """Single-device results: no mesh, no dispatch hook."""
  model = make_decoder()
  embeds, ids, lengths, _ = golden_batch()
  return (np.asarray(forward_logits(model, embeds)), greedy(model, embeds, lengths),
          nnx.to_flat_state(loss_grads(make_trainable_decoder(), embeds, ids, lengths)))


@functools.cache
def sharded(spec: str, capacity_factor=None, impl=None):
  mesh = sharding.parse_mesh(spec)
  model = sharding.distribute(make_decoder(), mesh, capacity_factor=capacity_factor, impl=impl)
  return mesh, model


def _tol(ref):
  return 1e-5 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("spec", MESHES)
def test_golden_logits_match_single_device(spec):
  _, model = sharded(spec)
  embeds, _, lengths, cases = golden_batch()
  ref = reference()[0]
  got = np.asarray(forward_logits(model, embeds))
  for i, (name, case) in enumerate(cases):
    n = int(lengths[i])
    err = np.abs(got[i, :n] - ref[i, :n]).max()
    assert err <= _tol(ref[i, :n]), f"{spec} {name}: max abs error vs single device {err}"
    golden_err = np.abs(got[i, :n] - case["logits"]).max()
    assert golden_err <= 1e-4 * max(1.0, np.abs(case["logits"]).max()), f"{spec} {name}: vs golden {golden_err}"


@pytest.mark.parametrize("spec", MESHES)
def test_golden_greedy_tokens_identical(spec):
  _, model = sharded(spec)
  embeds, _, lengths, cases = golden_batch()
  got = greedy(model, embeds, lengths)
  np.testing.assert_array_equal(got, reference()[1])
  for i, (name, case) in enumerate(cases):
    np.testing.assert_array_equal(got[i], case["gen_ids"][:GEN_STEPS], err_msg=f"{spec} {name}")


@pytest.mark.parametrize("spec", MESHES)
def test_golden_gradients_match_single_device(spec):
  _, model = sharded(spec, impl="ragged")  # the differentiable grouped FFN (see sharding_common)
  embeds, ids, lengths, _ = golden_batch()
  got = dict(nnx.to_flat_state(loss_grads(model, embeds, ids, lengths)))
  ref = reference()[2]
  assert len(ref) == len(got)
  # Every parameter but the token embedding (the decoder is fed inputs_embeds) gets a gradient.
  assert sum(np.abs(np.asarray(r.get_value())).max() > 0 for _, r in ref) == len(ref) - 1
  for path, r in ref:
    r, g = np.asarray(r.get_value()), np.asarray(got[path].get_value())
    err = np.abs(g - r).max()
    assert err <= 1e-4 * np.abs(r).max() + 1e-9, f"{spec} {'.'.join(map(str, path))}: max abs error {err}"


@pytest.mark.parametrize("spec", MESHES)
def test_parameters_really_sharded(spec):
  mesh, model = sharded(spec)
  ep, fsdp = mesh.shape["expert"], mesh.shape["fsdp"]
  experts = model.layers[1].mlp.experts
  for w in (experts.gate_proj, experts.up_proj, experts.down_proj):
    arr = w[...]
    assert arr.sharding.spec[0] == "expert"
    held = sharding.per_device_bytes(arr)
    assert len(held) == 8
    # [E, embed, moe_mlp] is split E/expert ways and embed over fsdp (embed = 64 divides by 2).
    assert set(held.values()) == {arr.nbytes // (ep * fsdp)}, held
  q = model.layers[0].self_attn.q_proj.kernel[...]
  assert set(sharding.per_device_bytes(q).values()) == {q.nbytes // fsdp}
  assert model.layers[0].input_layernorm.scale[...].sharding.is_fully_replicated
  assert expert_parallel.moe_layers(model) and all(
      isinstance(m.dispatch, expert_parallel.ExpertParallelDispatch) for m in expert_parallel.moe_layers(model))


def test_parse_mesh_on_eight_devices():
  mesh = sharding.parse_mesh("data=2,expert=-1")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
  assert sharding.parse_mesh(None).shape["data"] == 8
  assert sharding.parse_mesh("expert=1", devices=jax.devices()[:1]).size == 1
  with pytest.raises(ValueError, match="needs 6 devices, 8 available"):
    sharding.parse_mesh("data=2,expert=3")


def _expected_drops(ids: np.ndarray, shards: int, num_experts: int, capacity_factor: float) -> int:
  """Hand count: tokens split evenly over `shards` devices in order; per device and expert the first
  ceil(cf * n_local * k / E) assignments (in token order) are kept."""
  n, k = ids.shape
  local = -(-n // shards)
  cap = max(1, int(np.ceil(capacity_factor * local * k / num_experts)))
  dropped = 0
  for s in range(shards):
    chunk = ids[s * local:(s + 1) * local].reshape(-1)
    counts = np.bincount(chunk, minlength=num_experts)
    dropped += int(np.maximum(counts - cap, 0).sum())
  return dropped


@nnx.jit
def logits_and_routing(model, x):
  out = model(x, jnp.arange(x.shape[1])[None])
  return out.logits, [r.topk_ids for r in out.router]


def test_capacity_factor_counts_dropped_assignments():
  embeds, _, lengths, _ = golden_batch()
  n = int(lengths[-1])
  x = embeds[-1:, :n]  # one case, unpadded: N = n tokens
  _, model = sharded("expert=8", 0.5)
  _, lossless = sharded("expert=8", float(NUM_EXPERTS))
  _, routing = logits_and_routing(model, x)
  got = int(expert_parallel.dropped_assignments(model))
  want = sum(_expected_drops(np.asarray(ids[0]), 8, NUM_EXPERTS, 0.5) for ids in routing)
  assert got == want and got > 0
  # capacity >= every row: nothing dropped, same logits as the single-device model.
  full, _ = logits_and_routing(lossless, x)
  assert int(expert_parallel.dropped_assignments(lossless)) == 0
  ref, _ = logits_and_routing(make_decoder(), x)
  assert np.abs(np.asarray(full) - np.asarray(ref)).max() <= _tol(ref)
