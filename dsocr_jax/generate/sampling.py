"""Per-request sampling settings (OpenAI semantics) and the token sampler that runs inside the jitted step.

Every slot of a decode batch carries its own settings as one row of `SlotSampling` arrays, so requests with
different temperatures, penalties and seeds share one compiled step. Order of operations (vLLM/OpenAI):
frequency/presence penalties over the request's GENERATED tokens -> banned ids (no-repeat n-gram rule) ->
greedy argmax when temperature == 0, else temperature -> top-k -> top-p -> sample.

Randomness: the key of a sampled token is derived from the request's seed and the index of that token in the
request's output only (never from the slot or the batch), so a seeded request yields the same tokens alone or
batched. Log-probabilities are those of the raw model distribution (log_softmax of the logits before penalties,
bans and temperature), as vLLM reports by default.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

MAX_TOP_LOGPROBS = 20  # OpenAI's bound; the step always computes this many and the host keeps what was asked
MAX_NGRAM_WINDOW = 256  # the banned-id array of a step is this wide: the rule can ban at most `window` ids
_UINT32 = 1 << 32


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """What a request asks of generation. `validate()` raises ValueError naming the offending field.

  ngram_size / ngram_window: the official no-repeat n-gram rule over generated ids (spec 5.6; 0 = off).
  repetition_*: the loop detector (`stopping.RepetitionDetector`): the generation ends with finish_reason
  "stop" / stop_reason "repetition" once its tail is one span of `repetition_min_span`..`repetition_max_span`
  tokens repeated at least `repetition_min_repeats` times back to back, covering at least
  `repetition_min_tokens` tokens. Defaults are our choice (not from the official code): long enough that the
  short legitimate repeats of tables and lists pass, short enough to end a runaway page early.
  """
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  frequency_penalty: float = 0.0
  presence_penalty: float = 0.0
  seed: int | None = None
  max_tokens: int = 256
  stop: Sequence[str] = ()
  stop_token_ids: Sequence[int] = ()
  logprobs: bool = False
  top_logprobs: int = 0
  ngram_size: int = 30
  ngram_window: int = 90
  repetition_stop: bool = True
  repetition_min_span: int = 1
  repetition_max_span: int = 256
  repetition_min_repeats: int = 8
  repetition_min_tokens: int = 256
  ignore_eos: bool = False
  skip_special_tokens: bool = False

  def __post_init__(self):
    # Accept a single stop string / any iterable, store tuples (the dataclass is frozen and hashable).
    if isinstance(self.stop, str):
      object.__setattr__(self, "stop", (self.stop,))
    if self.stop is None:
      object.__setattr__(self, "stop", ())
    if self.stop_token_ids is None:
      object.__setattr__(self, "stop_token_ids", ())
    object.__setattr__(self, "stop", tuple(self.stop))
    object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0

  def validate(self, vocab_size: int | None = None) -> None:
    def need(cond, field, msg):
      if not cond:
        raise ValueError(f"{field}: {msg}")

    def is_int(x):
      return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    def is_num(x):
      return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)

    need(is_num(self.temperature) and 0.0 <= self.temperature <= 2.0, "temperature",
         f"must be a number in [0, 2], got {self.temperature!r}")
    need(is_num(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p!r}")
    need(is_int(self.top_k) and self.top_k >= 0, "top_k", f"must be an integer >= 0 (0 = off), got {self.top_k!r}")
    for field in ("frequency_penalty", "presence_penalty"):
      v = getattr(self, field)
      need(is_num(v) and -2.0 <= v <= 2.0, field, f"must be a number in [-2, 2], got {v!r}")
    need(self.seed is None or (is_int(self.seed) and -(1 << 63) <= self.seed < (1 << 64)), "seed",
         f"must be an integer (64-bit) or null, got {self.seed!r}")
    need(is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens",
         f"must be an integer >= 1, got {self.max_tokens!r}")
    need(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
    need(len(self.stop) <= 16, "stop", f"at most 16 stop strings, got {len(self.stop)}")
    need(all(is_int(t) and t >= 0 and (vocab_size is None or t < vocab_size) for t in self.stop_token_ids),
         "stop_token_ids", f"must be token ids in [0, {vocab_size}), got {list(self.stop_token_ids)!r}")
    need(isinstance(self.logprobs, bool), "logprobs", f"must be true or false, got {self.logprobs!r}")
    need(is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, "top_logprobs",
         f"must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs!r}")
    need(self.top_logprobs == 0 or self.logprobs, "top_logprobs", "requires logprobs to be true")
    need(is_int(self.ngram_size) and self.ngram_size >= 0, "ngram_size",
         f"must be an integer >= 0 (0 = off), got {self.ngram_size!r}")
    need(is_int(self.ngram_window) and 1 <= self.ngram_window <= MAX_NGRAM_WINDOW, "ngram_window",
         f"must be an integer in [1, {MAX_NGRAM_WINDOW}], got {self.ngram_window!r}")
    need(self.ngram_size == 0 or self.ngram_size <= self.ngram_window, "ngram_size",
         f"{self.ngram_size} exceeds ngram_window {self.ngram_window}")
    for field in ("repetition_min_span", "repetition_max_span", "repetition_min_repeats", "repetition_min_tokens"):
      v = getattr(self, field)
      need(is_int(v) and 1 <= v <= 4096, field, f"must be an integer in [1, 4096], got {v!r}")
    need(self.repetition_min_span <= self.repetition_max_span, "repetition_min_span",
         f"{self.repetition_min_span} exceeds repetition_max_span {self.repetition_max_span}")
    need(self.repetition_min_repeats >= 2, "repetition_min_repeats", "must be >= 2")
    for field in ("repetition_stop", "ignore_eos", "skip_special_tokens"):
      need(isinstance(getattr(self, field), bool), field, f"must be true or false, got {getattr(self, field)!r}")


def seed_words(seed: int) -> tuple[int, int]:
  """A 64-bit seed as the (high, low) uint32 words of a threefry key (what `jax.random.PRNGKey(seed)` holds)."""
  s = int(seed) % (1 << 64)
  return s >> 32, s % _UINT32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotSampling:
  """Sampling settings of a batch, one row per slot (host numpy or device arrays)."""
  temperature: jax.Array  # [B] f32, 0 = greedy
  top_p: jax.Array  # [B] f32
  top_k: jax.Array  # [B] i32, 0 = off
  frequency_penalty: jax.Array  # [B] f32
  presence_penalty: jax.Array  # [B] f32
  seed: jax.Array  # [B, 2] uint32 (high, low)
  step: jax.Array  # [B] i32: index of the token being sampled within the request's output

  @classmethod
  def empty(cls, batch: int) -> "SlotSampling":
    return cls(np.zeros(batch, np.float32), np.ones(batch, np.float32), np.zeros(batch, np.int32),
               np.zeros(batch, np.float32), np.zeros(batch, np.float32), np.zeros((batch, 2), np.uint32),
               np.zeros(batch, np.int32))

  def row(self, i: int) -> "SlotSampling":
    """Row i as a batch of one (views of the host arrays)."""
    return SlotSampling(**{f.name: getattr(self, f.name)[i:i + 1] for f in dataclasses.fields(self)})

  def set_row(self, row: int, p: SamplingParams, seed: int, step: int) -> None:
    """Fills one host row (the arrays must be numpy)."""
    self.temperature[row] = p.temperature
    self.top_p[row] = p.top_p
    self.top_k[row] = p.top_k
    self.frequency_penalty[row] = p.frequency_penalty
    self.presence_penalty[row] = p.presence_penalty
    self.seed[row] = seed_words(seed)
    self.step[row] = step


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Sampled:
  tokens: jax.Array  # [B] i32
  logprob: jax.Array  # [B] f32, raw-model log-probability of the chosen token
  top_ids: jax.Array  # [B, MAX_TOP_LOGPROBS] i32 (zeros when no slot asked for top logprobs)
  top_logprobs: jax.Array  # [B, MAX_TOP_LOGPROBS] f32


def adjust_logits(logits: jax.Array, counts: jax.Array, s: SlotSampling, banned: jax.Array) -> jax.Array:
  """Penalties over generated-token `counts` [B,V], then `banned` [B,W] ids (-1 = none) set to -inf."""
  counts = counts.astype(jnp.float32)
  logits = logits - s.frequency_penalty[:, None] * counts - s.presence_penalty[:, None] * (counts > 0)
  vocab = logits.shape[-1]
  cols = jnp.where(banned < 0, vocab, banned)  # out of range -> dropped by the scatter
  rows = jnp.broadcast_to(jnp.arange(logits.shape[0])[:, None], cols.shape)
  return logits.at[rows, cols].set(-jnp.inf, mode="drop")


def _truncation_threshold(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Per row, the smallest logit kept by top-k and top-p (ties at the threshold are kept)."""
  desc = -jnp.sort(-scaled, axis=-1)
  vocab = scaled.shape[-1]
  k_idx = jnp.where(top_k > 0, jnp.minimum(top_k, vocab) - 1, vocab - 1)
  k_thresh = jnp.take_along_axis(desc, k_idx[:, None], axis=-1)[:, 0]
  probs = jax.nn.softmax(desc, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly better tokens
  keep = mass_before < top_p[:, None]  # the first token is always kept
  p_idx = jnp.maximum(jnp.sum(keep, axis=-1) - 1, 0)
  p_thresh = jnp.take_along_axis(desc, p_idx[:, None], axis=-1)[:, 0]
  return jnp.maximum(k_thresh, p_thresh)


def _sample_random(logits: jax.Array, s: SlotSampling) -> jax.Array:
  """Temperature, top-k, top-p and a Gumbel-max draw with the per-request key of this output index."""
  scaled = logits / jnp.maximum(s.temperature, 1e-6)[:, None]
  truncate = jnp.any((s.top_k > 0) | (s.top_p < 1.0))
  thresh = jax.lax.cond(truncate, lambda: _truncation_threshold(scaled, s.top_k, s.top_p),
                        lambda: jnp.full(scaled.shape[:1], -jnp.inf, scaled.dtype))
  scaled = jnp.where(scaled >= thresh[:, None], scaled, -jnp.inf)

  def gumbel(seed, step):
    key = jax.random.fold_in(jax.random.wrap_key_data(seed, impl="threefry2x32"), step)
    return jax.random.gumbel(key, scaled.shape[-1:], jnp.float32)

  noise = jax.vmap(gumbel)(s.seed, s.step)
  return jnp.argmax(scaled + noise, axis=-1).astype(jnp.int32)


def sample(logits: jax.Array, counts: jax.Array, s: SlotSampling, banned: jax.Array,
           want_top: jax.Array) -> Sampled:
  """logits [B,V] f32 -> one token per row. `want_top` (traced bool): compute the top-20 log-probabilities.

  Pure and row-independent: row b's result depends only on row b's inputs (batch invariance). The random and
  top-logprob branches sit under `lax.cond`, so an all-greedy batch pays for neither and nothing recompiles.
  """
  adjusted = adjust_logits(logits, counts, s, banned)
  greedy = jnp.argmax(adjusted, axis=-1).astype(jnp.int32)
  is_greedy = s.temperature <= 0.0
  tokens = jax.lax.cond(jnp.all(is_greedy), lambda: greedy,
                        lambda: jnp.where(is_greedy, greedy, _sample_random(adjusted, s)))
  lse = jax.nn.logsumexp(logits, axis=-1)
  chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - lse

  def top():
    k = min(MAX_TOP_LOGPROBS, logits.shape[-1])
    vals, ids = jax.lax.top_k(logits, k)
    pad = ((0, 0), (0, MAX_TOP_LOGPROBS - k))  # a toy vocabulary smaller than 20
    return jnp.pad(ids.astype(jnp.int32), pad), jnp.pad(vals - lse[:, None], pad, constant_values=-jnp.inf)

  def no_top():
    b = logits.shape[0]
    return jnp.zeros((b, MAX_TOP_LOGPROBS), jnp.int32), jnp.zeros((b, MAX_TOP_LOGPROBS), jnp.float32)

  top_ids, top_lps = jax.lax.cond(want_top, top, no_top)
  return Sampled(tokens, chosen, top_ids, top_lps)


def count_tokens(counts: jax.Array, tokens: jax.Array) -> jax.Array:
  """counts[b, tokens[b]] += 1."""
  return counts.at[jnp.arange(counts.shape[0]), tokens].add(1)
