"""Sampling maths, the no-repeat n-gram rule, the loop detector and stop strings against hand-worked examples."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import golden_cases
from dsocr_jax.generate.sampling import (MAX_NGRAM_WINDOW, MAX_TOP_LOGPROBS, SamplingParams, SlotSampling,
                                         count_tokens, sample, seed_words)
from dsocr_jax.generate.stopping import RepetitionDetector, StopStrings, ngram_banned_ids

V = 8


def slots(*params: SamplingParams, seeds=None, steps=None) -> SlotSampling:
  s = SlotSampling.empty(len(params))
  for i, p in enumerate(params):
    s.set_row(i, p, (seeds or [0] * len(params))[i], (steps or [0] * len(params))[i])
  return s


_sample = jax.jit(sample)


def run(logits, params, counts=None, banned=None, want_top=False, **kw):
  logits = jnp.asarray(logits, jnp.float32)
  b = logits.shape[0]
  counts = jnp.zeros((b, logits.shape[1]), jnp.int32) if counts is None else jnp.asarray(counts, jnp.int32)
  banned = np.full((b, MAX_NGRAM_WINDOW), -1, np.int32) if banned is None else banned
  return jax.device_get(_sample(logits, counts, slots(*params, **kw), banned, want_top))


LOGITS = np.log(np.array([[0.05, 0.5, 0.2, 0.1, 0.05, 0.04, 0.03, 0.03]], np.float32))


# ------------------------------------------------------------------------------------------------ sampler

def test_greedy_penalties_and_bans_hand_worked():
  greedy = SamplingParams()
  assert run(LOGITS, [greedy]).tokens.tolist() == [1]
  banned = np.full((1, MAX_NGRAM_WINDOW), -1, np.int32)
  banned[0, :2] = [1, 7]
  assert run(LOGITS, [greedy], banned=banned).tokens.tolist() == [2]
  # logit(1) = log .5 = -0.693, logit(2) = log .2 = -1.609: token 1 generated 3 times with frequency 0.2 costs
  # 0.6 (still best, -1.293); adding presence 0.5 costs 1.1 more (-1.793 < -1.609) -> token 2.
  counts = np.zeros((1, V), np.int32)
  counts[0, 1] = 3
  assert run(LOGITS, [SamplingParams(frequency_penalty=0.2)], counts=counts).tokens.tolist() == [1]
  assert run(LOGITS, [SamplingParams(frequency_penalty=0.2, presence_penalty=0.5)],
             counts=counts).tokens.tolist() == [2]
  # A negative penalty favours what was generated: log .1 + 2 = -0.303 > log .5.
  counts[0, 1], counts[0, 3] = 0, 1
  assert run(LOGITS, [SamplingParams(presence_penalty=-2.0)], counts=counts).tokens.tolist() == [3]


def test_logprobs_are_raw_model_log_softmax():
  out = run(LOGITS, [SamplingParams(presence_penalty=2.0)], counts=np.eye(1, V, 1, dtype=np.int32),
            want_top=True)
  assert out.tokens.tolist() == [2]  # chosen after the penalty ...
  assert out.logprob[0] == pytest.approx(np.log(0.2), abs=1e-6)  # ... but reported without it
  assert out.top_ids[0, :3].tolist() == [1, 2, 3]
  assert out.top_logprobs[0, :3] == pytest.approx(np.log([0.5, 0.2, 0.1]), abs=1e-6)
  assert out.top_ids.shape == (1, MAX_TOP_LOGPROBS)


def test_top_k_and_top_p_truncate_the_distribution():
  draws = lambda p: {int(t) for t in run(np.repeat(LOGITS, 64, 0), [p] * 64, seeds=list(range(64))).tokens}
  hot = SamplingParams(temperature=2.0, seed=0)
  assert len(draws(hot)) > 3  # untruncated and hot: many ids appear
  assert draws(dataclasses.replace(hot, top_k=2)) <= {1, 2}
  # top_p 0.65: mass before token 1 is 0, before 2 is .5, before 3 is .7 >= .65 -> keep {1, 2} (on the
  # temperature-1 distribution; temperature 1 keeps the hand-worked masses exact).
  assert draws(SamplingParams(temperature=1.0, top_p=0.65)) <= {1, 2}
  assert draws(SamplingParams(temperature=1.0, top_k=1)) == {1}


def test_sampling_frequencies_follow_the_distribution():
  n = 4000
  out = run(np.repeat(LOGITS, n, 0), [SamplingParams(temperature=1.0)] * n, seeds=[42] * n,
            steps=list(range(n)))
  freq = np.bincount(out.tokens, minlength=V) / n
  np.testing.assert_allclose(freq, np.exp(LOGITS[0]), atol=0.03)  # ~4 sigma for p = .5 at n = 4000


def test_seeded_rows_are_independent_of_batch_position_and_neighbours():
  p = SamplingParams(temperature=1.0)
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 1000)).astype(np.float32)
  alone = run(logits[:1], [p], seeds=[99], steps=[5]).tokens[0]
  other = SamplingParams(temperature=0.7, top_p=0.8)
  batch = np.stack([logits[1], logits[2], logits[0], logits[3]])
  out = run(batch, [other, SamplingParams(), p, other], seeds=[1, 2, 99, 3], steps=[0, 9, 5, 2])
  assert out.tokens[2] == alone
  # The key depends on (seed, step): another step of the same request draws independently.
  draws = {int(run(logits[:1], [p], seeds=[99], steps=[s]).tokens[0]) for s in range(20)}
  assert len(draws) > 1


def test_seed_words_and_count_tokens():
  assert seed_words(5) == (0, 5)
  assert seed_words((3 << 32) + 7) == (3, 7)
  assert seed_words(-1) == (0xFFFFFFFF, 0xFFFFFFFF)
  counts = count_tokens(jnp.zeros((2, 4), jnp.int32), jnp.array([3, 0]))
  assert counts.tolist() == [[0, 0, 0, 1], [1, 0, 0, 0]]


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", 2.5), ("top_p", 0.0), ("top_p", 1.1), ("top_k", -1),
    ("frequency_penalty", 2.5), ("presence_penalty", -3.0), ("seed", "x"), ("max_tokens", 0),
    ("stop", ("",)), ("stop_token_ids", (5000,)), ("top_logprobs", 21), ("ngram_size", -1),
    ("ngram_window", MAX_NGRAM_WINDOW + 1), ("repetition_min_repeats", 1), ("temperature", float("nan")),
])
def test_sampling_params_validation_names_the_field(field, value):
  kwargs = {field: value}
  if field == "top_logprobs":
    kwargs["logprobs"] = True
  with pytest.raises(ValueError, match=f"^{field}:"):
    SamplingParams(**kwargs).validate(vocab_size=1024)


def test_sampling_params_defaults_are_the_official_ocr_settings():
  p = SamplingParams(stop="END")
  p.validate(1024)
  assert (p.temperature, p.ngram_size, p.ngram_window, p.stop) == (0.0, 30, 90, ("END",))


# ------------------------------------------------------------------------------------------------ n-gram rule

def test_ngram_rule_hand_worked():
  # n = 3, prefix = last 2 ids (7, 8); starts i in [0, L-3]: (7, 8) at i = 0 -> ban 9, at i = 3 -> ban 5.
  gen = [7, 8, 9, 7, 8, 5, 1, 7, 8]
  assert ngram_banned_ids(gen, 3, 100).tolist() == [5, 9]
  # Window 6: starts from L - 6 = 3 only -> ban 5.
  assert ngram_banned_ids(gen, 3, 6).tolist() == [5]
  # Whitelisted ids are never banned.
  assert ngram_banned_ids(gen, 3, 100, whitelist=[9, 4]).tolist() == [5]
  # Fewer than n ids, or n = 0: no-op.
  assert ngram_banned_ids([7, 8], 3, 100).size == 0
  assert ngram_banned_ids(gen, 0, 100).size == 0
  # The last n-gram start is L - n: the prefix itself (i = L - 2) is not a match of itself.
  assert ngram_banned_ids([1, 2, 3], 2, 100).size == 0
  assert ngram_banned_ids([3, 2, 3], 2, 100).tolist() == [2]


def test_ngram_rule_official_settings_on_a_loop():
  loop = list(range(100, 120)) * 3  # period 20 < 30: the 30-gram about to repeat is banned
  assert ngram_banned_ids(loop, 30, 90).tolist() == [100]
  assert ngram_banned_ids(loop[:48], 30, 90).size == 0  # the 29-token prefix has not occurred before yet
  assert ngram_banned_ids(loop[:49], 30, 90).tolist() == [109]  # it has, at start 0


# ------------------------------------------------------------------------------------------------ loop detector

def feed(det, ids):
  return [det.add(t) for t in ids]


def test_repetition_detector_hand_worked():
  # period 3, >= 4 copies, >= 10 tokens: fires at the 12th token (4 copies of 1 2 3).
  fired = feed(RepetitionDetector(1, 8, 4, 10), [1, 2, 3] * 5)
  assert fired.index(True) == 11
  # min_span 4 ignores the period-3 loop until it is also a period-6 loop with 4 copies (24 tokens).
  fired = feed(RepetitionDetector(4, 8, 4, 10), [1, 2, 3] * 9)
  assert fired.index(True) == 23
  # A broken loop resets.
  det = RepetitionDetector(1, 8, 4, 10)
  assert not any(feed(det, [1, 2, 3] * 3 + [4] + [1, 2, 3] * 3))


def test_repetition_detector_defaults_on_golden_continuations():
  p = SamplingParams()
  make = lambda: RepetitionDetector(p.repetition_min_span, p.repetition_max_span, p.repetition_min_repeats,
                                    p.repetition_min_tokens)
  for path in golden_cases():
    assert not any(feed(make(), np.load(path)["gen_ids"].tolist()))
  # The "36 103" pair that repeats 6 times in a golden continuation fires once it runs on for 256 tokens.
  fired = feed(make(), [36, 103] * 200)
  assert fired.index(True) == 255


# ------------------------------------------------------------------------------------------------ stop strings

def test_stop_strings_across_pieces_and_hold_back():
  s = StopStrings(["lo Wo", "END"])
  assert s.feed("Hel") == ("He", None)  # "l" may start "lo Wo": held back
  assert s.feed("lo W") == ("l", None)
  assert s.feed("orld") == ("", "lo Wo")
  s = StopStrings(["END"])
  assert s.feed("abcE") == ("abc", None)
  assert s.feed("N") == ("", None)
  assert s.feed("x") == ("ENx", None)
  assert s.feed("yE") == ("y", None)
  assert s.flush() == "E"
  # The earliest match wins, whatever the order of the stop list.
  assert StopStrings(["cd", "b"]).feed("abcd") == ("a", "b")
  assert StopStrings([]).feed("abc") == ("abc", None)
