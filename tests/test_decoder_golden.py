"""Decoder parity with the official implementation on every golden case (fed the golden inputs_embeds).

Tolerances: logits and hidden states max abs error <= 1e-4 * max(1, max|ref|); MoE top-k expert ids exact
wherever the official routing margin exceeds 1e-5 (below that, rounding may legitimately reorder experts).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import GOLDEN_DIR, case_id, golden_cases
from dsocr_jax.checkpoint import hf
from dsocr_jax.config import load_config
from dsocr_jax.model import moe, params
from dsocr_jax.model.decoder import Decoder

CASES = golden_cases()


def _tol(ref):
  return 1e-4 * max(1.0, float(np.abs(ref).max()))


@functools.cache
def golden_decoder():
  cfg = load_config(GOLDEN_DIR)
  tree = hf.load_params(GOLDEN_DIR, cfg, parts=("decoder",))
  return cfg, params.from_tree(lambda: Decoder(cfg.decoder, rngs=nnx.Rngs(0)), tree["decoder"])


@functools.cache
def _forward(path):
  cfg, dec = golden_decoder()
  case = np.load(path)
  embeds = jnp.asarray(case["inputs_embeds"])[None]
  positions = jnp.arange(embeds.shape[1])[None]
  out = dec(embeds, positions, return_hidden=True)
  return cfg, case, out


def test_golden_cases_present():
  assert len(CASES) >= 1, f"no golden cases under {GOLDEN_DIR}/cases"


@pytest.mark.parametrize("path", CASES, ids=[case_id(c) for c in CASES])
def test_golden_decoder_logits(path):
  _, case, out = _forward(path)
  ref = case["logits"]
  got = np.asarray(out.logits[0])
  assert got.shape == ref.shape
  err = np.abs(got - ref).max()
  assert err <= _tol(ref), f"max abs logit error {err}"


# The golden set stores per-layer hidden states only for prompts of <= 600 tokens: check every case that has them.
CASES_WITH_HIDDEN = [c for c in CASES if "decoder_hidden_states" in np.load(c).files]


def test_golden_some_cases_store_hidden_states():
  assert CASES_WITH_HIDDEN, "no golden case stores decoder_hidden_states"


@pytest.mark.parametrize("path", CASES_WITH_HIDDEN, ids=[case_id(c) for c in CASES_WITH_HIDDEN])
def test_golden_decoder_hidden_states(path):
  _, case, out = _forward(path)
  ref = case["decoder_hidden_states"]
  assert len(out.hidden_states) == ref.shape[0]
  for layer, h in enumerate(out.hidden_states):
    err = np.abs(np.asarray(h[0]) - ref[layer]).max()
    assert err <= _tol(ref[layer]), f"layer {layer}: max abs error {err}"


@pytest.mark.parametrize("path", CASES, ids=[case_id(c) for c in CASES])
def test_golden_moe_routing(path):
  cfg, case, out = _forward(path)
  moe_layers = [i for i in range(cfg.decoder.num_hidden_layers) if cfg.decoder.is_moe_layer(i)]
  assert len(out.router) == len(moe_layers)
  checked = 0
  for layer, info in zip(moe_layers, out.router):
    margin = case[f"moe_topk_margin_layer{layer}"]
    sure = margin > 1e-5
    got = np.asarray(info.topk_ids[0])
    np.testing.assert_array_equal(got[sure], case[f"moe_topk_idx_layer{layer}"][sure])
    np.testing.assert_allclose(np.asarray(info.topk_weights[0])[sure], case[f"moe_topk_weight_layer{layer}"][sure],
                               atol=1e-5)
    checked += int(sure.sum())
  assert checked > 0


def test_grouped_ffn_implementations_agree():
  """The CPU segment loop and jax.lax.ragged_dot compute the same grouped expert FFN."""
  cfg, dec = golden_decoder()
  experts = dec.layers[1].mlp.experts
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, cfg.decoder.n_routed_experts, size=(37, 2)))
  x = jnp.asarray(rng.standard_normal((37, cfg.decoder.hidden_size)), jnp.float32)
  order, token_of_row, sizes = moe.sort_by_expert(ids, cfg.decoder.n_routed_experts)
  a = experts(x[token_of_row], sizes, impl="segments")
  b = experts(x[token_of_row], sizes, impl="ragged")
  c = moe.grouped_ffn_segments(x[token_of_row], sizes, experts.expert, cfg.decoder.n_routed_experts, chunk=8)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  np.testing.assert_allclose(np.asarray(c), np.asarray(b), atol=1e-5)
  # Reference: every (token, expert) pair computed densely.
  wg, wu, wd = (np.asarray(w) for w in experts.stacked())
  xs = np.asarray(x)[np.asarray(token_of_row)]
  eid = np.asarray(ids).reshape(-1)[np.asarray(order)]
  ref = np.stack([(lambda h: (h / (1 + np.exp(-h))) * (r @ wu[e]))(r @ wg[e]) @ wd[e] for r, e in zip(xs, eid)])
  np.testing.assert_allclose(np.asarray(a), ref, atol=1e-5)


def test_cache_prefill_then_decode_matches_full_forward():
  """KV-cache path: prefill a prefix into a padded cache, then decode token by token = one full forward."""
  cfg, dec = golden_decoder()
  case = np.load(CASES[0])
  embeds = jnp.asarray(case["inputs_embeds"])[None]
  t = embeds.shape[1]
  hd, nh = cfg.decoder.head_dim, cfg.decoder.num_attention_heads
  cache = [(jnp.zeros((1, nh, t + 8, hd)), jnp.zeros((1, nh, t + 8, hd))) for _ in range(cfg.decoder.num_hidden_layers)]
  split = t - 4
  out = dec(embeds[:, :split], jnp.arange(split)[None], cache=cache)
  rows, cache = [out.logits[0, -1]], out.cache
  for p in range(split, t):
    step = dec(embeds[:, p:p + 1], jnp.full((1, 1), p), cache=cache)
    cache = step.cache
    rows.append(step.logits[0, 0])
  ref = case["logits"][split - 1:]
  err = np.abs(np.stack([np.asarray(r) for r in rows]) - ref).max()
  assert err <= _tol(ref), err


def test_segment_loop_gradients_match_ragged_dot():
  """The CPU grouped-FFN path is differentiable and its gradients equal ragged_dot's (training uses it)."""
  cfg, dec = golden_decoder()
  experts = dec.layers[1].mlp.experts
  rng = np.random.default_rng(1)
  ids = jnp.asarray(rng.integers(0, cfg.decoder.n_routed_experts, size=(29, 2)))
  x = jnp.asarray(rng.standard_normal((29, cfg.decoder.hidden_size)), jnp.float32)
  _, token_of_row, sizes = moe.sort_by_expert(ids, cfg.decoder.n_routed_experts)
  xs = x[token_of_row]
  weights = experts.stacked()

  def loss(impl, xs, weights):
    if impl == "ragged":
      y = moe.grouped_ffn_ragged(xs, sizes, weights)
    else:
      y = moe.grouped_ffn_segments(xs, sizes, lambda e: tuple(w[e] for w in weights),
                                   cfg.decoder.n_routed_experts, chunk=4)
    return jnp.sum(jnp.sin(y))

  ga = jax.grad(functools.partial(loss, "segments"), argnums=(0, 1))(xs, weights)
  gb = jax.grad(functools.partial(loss, "ragged"), argnums=(0, 1))(xs, weights)
  for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
