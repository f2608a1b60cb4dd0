"""The generation engine on the golden tiny checkpoint: golden greedy parity alone and batched, stop rules,
seeded sampling across batch compositions, slot bookkeeping, streaming, and no compilation after warm-up.

A second engine runs a copy of the golden decoder whose lm_head is zeroed: every logit is exactly 0, so its
outputs can be worked out by hand (argmax ties go to the lowest id; every log-probability is -log(vocab)).
"""

import asyncio
import dataclasses
import math
import time

import numpy as np
import pytest
from flax import nnx

from conftest import case_id, golden_cases
from dsocr_jax.checkpoint.hf import load_params
from dsocr_jax.config import load_config
from dsocr_jax.generate.engine import Engine, GenerationRequest, QueueFull, SamplingParams
from dsocr_jax.model import params
from dsocr_jax.model.decoder import Decoder
from dsocr_jax.text.tokenizer import Tokenizer

CASES = golden_cases()
MAX_SEQ_LEN = 640  # the longest golden prompt is 594 tokens, + 32 generated
BUCKETS = (128, 320, 640)
# The golden continuation: 32 greedy tokens, no EOS stop, no n-gram blocking (golden README).
GOLDEN_SAMPLING = SamplingParams(max_tokens=32, ignore_eos=True, ngram_size=0)


@pytest.fixture(scope="module")
def golden(golden_dir):
  cfg = load_config(golden_dir)
  tree = load_params(golden_dir, cfg, parts=("decoder",))
  decoder = params.from_tree(lambda: Decoder(cfg.decoder, rngs=nnx.Rngs(0)), tree["decoder"])
  return cfg, tree, decoder, Tokenizer.from_file(f"{golden_dir}/tokenizer.json")


@pytest.fixture(scope="module")
def engine(golden):
  _, _, decoder, tokenizer = golden
  eng = Engine(decoder, tokenizer, max_slots=8, max_seq_len=MAX_SEQ_LEN, prefill_buckets=BUCKETS, max_queue=16)
  eng.warmup()
  assert eng.compile_count == len(BUCKETS) + 1  # one prefill per bucket + the decode step
  with eng:
    yield eng


@pytest.fixture(scope="module")
def flat_engine(golden):
  """Zeroed lm_head: all logits 0. One slot and a one-request queue (for the queue-full test)."""
  cfg, tree, _, tokenizer = golden
  tree = dict(tree["decoder"], lm_head={"kernel": np.zeros_like(tree["decoder"]["lm_head"]["kernel"])})
  decoder = params.from_tree(lambda: Decoder(cfg.decoder, rngs=nnx.Rngs(0)), tree)
  eng = Engine(decoder, tokenizer, max_slots=1, max_seq_len=256, prefill_buckets=(16,), max_queue=1)
  eng.warmup()
  with eng:
    yield eng


@pytest.fixture(autouse=True)
def no_compilation_on_the_request_path(request):
  """Every test must run on the shapes compiled at warm-up."""
  engines = [request.getfixturevalue(n) for n in ("engine", "flat_engine") if n in request.fixturenames]
  before = [e.compile_count for e in engines]
  yield
  assert [e.compile_count for e in engines] == before, "a step function was traced again after warm-up"


def golden_request(path, sampling=GOLDEN_SAMPLING):
  d = np.load(path)
  req = GenerationRequest(d["input_ids"], sampling, d["images_seq_mask"], d["image_features"])
  return req, [int(i) for i in d["gen_ids"]]


def wait_idle(eng, timeout=10.0):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    s = eng.stats()
    if s.active_slots == 0 and s.queue_depth == 0:
      return s
    time.sleep(0.01)
  raise AssertionError(f"engine still busy: {eng.stats()}")


# --------------------------------------------------------------------------------------------- golden parity

@pytest.mark.parametrize("path", CASES, ids=[case_id(p) for p in CASES])
def test_golden_greedy_alone(engine, path):
  req, gen_ids = golden_request(path)
  res = engine.generate(req, timeout=60)
  assert res.token_ids == gen_ids  # greedy ids exact (golden README)
  assert (res.finish_reason, res.stop_reason) == ("length", None)
  assert (res.prompt_tokens, res.completion_tokens) == (len(req.input_ids), 32)


def test_golden_greedy_all_cases_in_one_batch(engine):
  pairs = [golden_request(p) for p in CASES]
  handles = [engine.submit(req) for req, _ in pairs]
  for h, (_, gen_ids) in zip(handles, pairs):
    assert h.result(timeout=120).token_ids == gen_ids
  assert wait_idle(engine).free_slots == engine.max_slots


def test_golden_default_loop_guards_leave_golden_continuations_alone(engine):
  """The official n-gram rule (30/90) and the loop detector are on by default and must not touch a normal
  continuation (some golden ones repeat a 2-token span 6 times)."""
  pairs = [golden_request(p, SamplingParams(max_tokens=32, ignore_eos=True)) for p in CASES]
  handles = [engine.submit(req) for req, _ in pairs]
  for h, (_, gen_ids) in zip(handles, pairs):
    res = h.result(timeout=120)
    assert (res.token_ids, res.finish_reason) == (gen_ids, "length")


# --------------------------------------------------------------------------------------------- stop rules

def test_golden_stop_string_across_tokens(engine, golden):
  tokenizer = golden[3]
  path = [p for p in CASES if case_id(p) == "small640_small"][0]
  _, gen_ids = golden_request(path)
  # gen_ids start 787, 839, 67 ('@'), 999: text "<tok787><tok839>@<tok999>..." (tokenizer pieces).
  assert tokenizer.decode(gen_ids[:4]) == "<tok787><tok839>@<tok999>"
  stop = "9>@<tok9"  # spans three tokens
  req, _ = golden_request(path, dataclasses.replace(GOLDEN_SAMPLING, stop=("zzz", stop)))
  handle = engine.submit(req)
  events = list(handle)
  res = handle.result()
  assert (res.finish_reason, res.stop_reason) == ("stop", stop)
  assert res.text == "<tok787><tok83"
  assert res.token_ids == gen_ids[:4]
  assert "".join(e.text for e in events) == res.text
  assert all(stop not in e.text for e in events)
  assert events[-1].finish_reason == "stop" and events[-1].usage.completion_tokens == 4


def test_golden_stop_token_id_and_max_tokens(engine):
  path = CASES[0]
  _, gen_ids = golden_request(path)
  target = gen_ids[5]
  first = gen_ids.index(target)
  res = engine.generate(golden_request(path, dataclasses.replace(GOLDEN_SAMPLING, stop_token_ids=(target,)))[0])
  assert (res.token_ids, res.finish_reason, res.stop_reason) == (gen_ids[:first + 1], "stop", target)
  res = engine.generate(golden_request(path, dataclasses.replace(GOLDEN_SAMPLING, max_tokens=3))[0])
  assert (res.token_ids, res.finish_reason, res.completion_tokens) == (gen_ids[:3], "length", 3)


# --------------------------------------------------------------------------------------------- sampling

def test_golden_seeded_sampling_same_alone_and_batched(engine):
  sampled = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, presence_penalty=0.5, frequency_penalty=0.3,
                           seed=1234, max_tokens=24, ignore_eos=True)
  req = lambda p, s: golden_request(p, s)[0]
  alone = engine.generate(req(CASES[1], sampled), timeout=60).token_ids
  others = [dataclasses.replace(sampled, seed=7), GOLDEN_SAMPLING, dataclasses.replace(sampled, temperature=1.5)]
  handles = [engine.submit(req(p, s)) for p, s in zip(CASES[2:] + CASES[:1], others)]
  batched = engine.submit(req(CASES[1], sampled))  # lands in another slot, at other steps of its neighbours
  assert batched.result(timeout=60).token_ids == alone
  for h in handles:
    h.result(timeout=60)
  reseeded = engine.generate(req(CASES[1], dataclasses.replace(sampled, seed=1235)), timeout=60).token_ids
  assert reseeded != alone


def test_flat_logits_penalties_and_logprobs(flat_engine):
  """All logits 0: greedy picks the lowest id not yet pushed down. With frequency_penalty each generated id
  drops below the others, so the output counts up 0, 1, 2, ... (EOS = 1 ignored)."""
  ids = np.array([0, 5, 6, 7])
  p = SamplingParams(frequency_penalty=0.5, max_tokens=6, ignore_eos=True, ngram_size=0, logprobs=True,
                     top_logprobs=3)
  res = flat_engine.generate(GenerationRequest(ids, p), timeout=30)
  assert res.token_ids == [0, 1, 2, 3, 4, 5]
  uniform = -math.log(1024)
  for token, lp, top in res.logprobs:
    assert lp == pytest.approx(uniform, abs=1e-5)
    assert [v for _, v in top] == pytest.approx([uniform] * 3, abs=1e-5)
  # presence_penalty: 0 then EOS (1), which ends the request when EOS is not ignored.
  res = flat_engine.generate(GenerationRequest(ids, SamplingParams(presence_penalty=1.0, ngram_size=0)))
  assert (res.token_ids, res.finish_reason, res.stop_reason) == ([0, 1], "stop", None)


def test_flat_logits_ngram_rule(flat_engine):
  """n = 3 by hand: 0 0 0 -> ban 0 -> 1; prefix (0, 1) unseen -> 0; prefix (1, 0) unseen -> 0;
  prefix (0, 0) was followed by 0 and by 1 -> both banned -> 2."""
  p = SamplingParams(ngram_size=3, ngram_window=90, max_tokens=7, ignore_eos=True, repetition_stop=False)
  res = flat_engine.generate(GenerationRequest(np.array([0, 5]), p), timeout=30)
  assert res.token_ids == [0, 0, 0, 1, 0, 0, 2]


def test_flat_logits_repetition_detector_ends_a_loop(flat_engine):
  p = SamplingParams(ngram_size=0, ignore_eos=True, max_tokens=200, repetition_min_repeats=8,
                     repetition_min_tokens=40)
  res = flat_engine.generate(GenerationRequest(np.array([0, 5]), p), timeout=30)
  assert (res.finish_reason, res.stop_reason) == ("stop", "repetition")
  assert res.token_ids == [0] * 40  # period 1: fires once 40 identical tokens are out


# --------------------------------------------------------------------------------------------- slots, streaming

def test_flat_cancel_frees_the_slot_and_queue_is_bounded(flat_engine):
  long = SamplingParams(ngram_size=0, ignore_eos=True, repetition_stop=False, max_tokens=250)
  running = flat_engine.submit(GenerationRequest(np.array([0, 5]), long))
  next(iter(running))  # it occupies the only slot
  queued = flat_engine.submit(GenerationRequest(np.array([0, 6]), long))
  with pytest.raises(QueueFull):
    flat_engine.submit(GenerationRequest(np.array([0, 7]), long))
  queued.cancel()
  running.cancel()
  assert running.result(timeout=10).finish_reason == "cancelled"
  assert running.result().completion_tokens < 250
  assert (queued.result(timeout=10).finish_reason, queued.result().completion_tokens) == ("cancelled", 0)
  stats = wait_idle(flat_engine)
  assert stats.free_slots == 1


def test_golden_async_stream_matches_result(engine):
  req, gen_ids = golden_request(CASES[0], dataclasses.replace(GOLDEN_SAMPLING, logprobs=True))

  async def consume():
    handle = engine.submit(req)
    return handle, [e async for e in handle]

  handle, events = asyncio.run(consume())
  res = handle.result()
  assert [e.token_id for e in events] == gen_ids == res.token_ids
  assert "".join(e.text for e in events) == res.text
  assert [e.finish_reason for e in events] == [None] * 31 + ["length"]
  assert events[-1].usage.prompt_tokens == len(req.input_ids)
  assert all(e.logprob is not None and e.logprob <= 0 for e in events)


def test_engine_stats_and_request_validation(engine):
  stats = wait_idle(engine)
  assert stats.tokens_generated > 0 and stats.requests_finished > 0 and stats.decode_steps > 0
  ids = np.array([0, 10, 11])
  bad = [
      (GenerationRequest(ids, SamplingParams(temperature=3.0)), "temperature"),
      (GenerationRequest(ids, SamplingParams(top_logprobs=3)), "top_logprobs"),
      (GenerationRequest(np.zeros(MAX_SEQ_LEN, np.int64)), "input_ids"),
      (GenerationRequest(np.array([0, 5000])), "input_ids"),
      (GenerationRequest(ids, images_seq_mask=np.array([False, True, False]),
                         image_features=np.zeros((2, 64), np.float32)), "image_features"),
  ]
  for req, field in bad:
    with pytest.raises(ValueError, match=f"^{field}:"):
      engine.submit(req)
