"""Continuous-batching generation engine (JetStream-style slots) with streaming and per-request sampling.

Public API (stable; the server builds on it):

  SamplingParams(...)                     dsocr_jax.generate.sampling: temperature, top_p, top_k, penalties, seed,
                                          max_tokens, stop, stop_token_ids, logprobs, top_logprobs, ngram_size,
                                          ngram_window, repetition_*, ignore_eos, skip_special_tokens
  GenerationRequest(input_ids, sampling, images_seq_mask=None, image_features=None, request_id=auto)
  Engine(decoder_or_model, tokenizer, *, max_slots=8, max_seq_len=2048, prefill_buckets=(...), max_queue=64,
         dtype=None)
    .start() / .stop() / `with Engine(...) as engine:`   background decode thread
    .warmup()                             compiles every prefill bucket and the decode step (call before serving)
    .submit(request) -> RequestHandle     raises ValueError (bad request, names the field), QueueFull, RuntimeError
    .generate(request) -> GenerationResult   blocking convenience
    .stats() -> EngineStats               active_slots, free_slots, queue_depth, tokens_generated, ...
  RequestHandle
    `for event in handle` / `async for event in handle`   GenerationEvent per generated token; the last one has
                                          finish_reason set and usage filled
    .cancel()                             frees the slot within one step (finish_reason "cancelled")
    .result(timeout=None) -> GenerationResult   (blocking; raises RuntimeError if the engine failed)
    .done -> bool
  GenerationEvent(token_id, text, logprob, top_logprobs, finish_reason, stop_reason, usage)
  GenerationResult(request_id, token_ids, text, finish_reason, stop_reason, prompt_tokens, completion_tokens,
                   logprobs)

finish_reason: "stop" (EOS, a stop token id, a stop string, or the loop detector), "length" (max_tokens or the
cache is full), "cancelled". stop_reason: None for EOS, the stop string, the stop token id, or "repetition".
The final EOS / stop token is counted in completion_tokens and token_ids but adds no text; a matched stop
string is not part of the text. `text` deltas are emitted only at complete UTF-8 characters.

How a step goes: the engine thread admits queued requests into free slots (a prefill per request, padded to
a length bucket, image features merged there), then runs one decode step for all slots; each slot's token is
checked on the host (EOS, stop ids, stop strings, loop detector, limits) and streamed; a finished or cancelled
request frees its slot before the next step. Positions continue from the prompt length (golden README).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque

import numpy as np

from dsocr_jax.generate import engine_io
from dsocr_jax.generate.engine_io import (GenerationEvent, GenerationRequest, GenerationResult, QueueFull,
                                          RequestHandle)
from dsocr_jax.generate.sampling import MAX_NGRAM_WINDOW, SamplingParams, SlotSampling
from dsocr_jax.generate.steps import StepFunctions
from dsocr_jax.generate.stopping import NGRAM_WHITELIST_TOKENS, RepetitionDetector, StopStrings, ngram_banned_ids
from dsocr_jax.text.tokenizer import IncrementalDecoder

__all__ = ["Engine", "EngineStats", "GenerationEvent", "GenerationRequest", "GenerationResult", "QueueFull",
           "RequestHandle", "SamplingParams"]

log = logging.getLogger(__name__)
DEFAULT_BUCKETS = (128, 256, 512, 1024, 2048)
_IDLE = SamplingParams()


@dataclasses.dataclass(frozen=True)
class EngineStats:
  active_slots: int
  free_slots: int
  max_slots: int
  queue_depth: int
  tokens_generated: int  # completion tokens over the engine's life
  prompt_tokens: int
  requests_finished: int
  decode_steps: int
  decode_seconds: float  # wall time inside decode steps (device + host bookkeeping)
  prefill_seconds: float


@dataclasses.dataclass
class _Slot:
  """A request that occupies a slot."""
  handle: RequestHandle
  slot: int
  seed: int
  next_pos: int  # position at which `last_token` will be fed
  last_token: int
  generated: list[int]
  stops: StopStrings
  detok: IncrementalDecoder | None
  repetition: RepetitionDetector | None
  text: list[str]
  logprobs: list | None

  @property
  def params(self) -> SamplingParams:
    return self.handle.request.sampling


class Engine:

  def __init__(self, decoder_or_model, tokenizer=None, *, max_slots: int = 8, max_seq_len: int = 2048,
               prefill_buckets: tuple[int, ...] = DEFAULT_BUCKETS, max_queue: int = 64, dtype=None):
    decoder = getattr(decoder_or_model, "decoder", decoder_or_model)
    self.cfg = decoder.cfg
    if max_slots < 1:
      raise ValueError(f"max_slots: must be >= 1, got {max_slots}")
    if max_seq_len < 2 or max_seq_len > self.cfg.max_position_embeddings:
      raise ValueError(f"max_seq_len: must be in [2, {self.cfg.max_position_embeddings}], got {max_seq_len}")
    buckets = tuple(sorted({min(int(b), max_seq_len) for b in prefill_buckets}))
    if not buckets or buckets[0] < 1:
      raise ValueError(f"prefill_buckets: need positive lengths, got {prefill_buckets}")
    if max_queue < 1:
      raise ValueError(f"max_queue: must be >= 1, got {max_queue}")
    self.tokenizer = tokenizer
    self.max_slots, self.max_seq_len, self.max_queue = max_slots, max_seq_len, max_queue
    self.eos_id = tokenizer.eos_id if tokenizer is not None else self.cfg.eos_token_id
    white = [tokenizer.token_id(t) for t in NGRAM_WHITELIST_TOKENS] if tokenizer is not None else []
    self.ngram_whitelist = tuple(int(i) for i in white if i is not None)
    self.steps = StepFunctions(decoder, slots=max_slots, max_len=max_seq_len, buckets=buckets,
                               dtype=dtype or decoder.dtype)
    self._sampling = SlotSampling.empty(max_slots)
    self._slots: list[_Slot | None] = [None] * max_slots
    self._queue: deque[RequestHandle] = deque()
    self._cond = threading.Condition()
    self._thread: threading.Thread | None = None
    self._running = False
    self._failure: BaseException | None = None
    self._seed_rng = np.random.default_rng()
    self._counters = dict(tokens_generated=0, prompt_tokens=0, requests_finished=0, decode_steps=0,
                          decode_seconds=0.0, prefill_seconds=0.0)

  # ------------------------------------------------------------------------------------------- lifecycle

  def warmup(self) -> None:
    """Compiles every shape the engine uses. Call before `start()` (or before any request)."""
    with self._cond:
      busy = any(self._slots) or self._queue
    if busy:
      raise RuntimeError("warmup: the engine has requests in flight")
    self.steps.warmup()

  def start(self) -> "Engine":
    with self._cond:
      if self._running:
        return self
      self._running = True
    self._thread = threading.Thread(target=self._loop, name="dsocr-engine", daemon=True)
    self._thread.start()
    return self

  def stop(self) -> None:
    """Stops the thread; requests still queued or running end with finish_reason "cancelled"."""
    with self._cond:
      self._running = False
      self._cond.notify_all()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    for i, s in enumerate(self._slots):
      if s is not None:
        self._finish(s, "cancelled", None, "")
    while self._queue:
      self._queue.popleft()._finish_unstarted("cancelled")

  def __enter__(self) -> "Engine":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  @property
  def compile_count(self) -> int:
    """How many times a step function has been traced (each trace is one compilation)."""
    return sum(self.steps.traces.values())

  # ------------------------------------------------------------------------------------------- requests

  def submit(self, request: GenerationRequest) -> RequestHandle:
    engine_io.validate_request(request, self.cfg, self.max_seq_len, self.steps.buckets[-1],
                               has_tokenizer=self.tokenizer is not None)
    handle = RequestHandle(request, self._wake)
    with self._cond:
      if self._failure is not None:
        raise RuntimeError(f"engine failed: {self._failure!r}")
      if not self._running:
        raise RuntimeError("engine is not running: call start() first")
      if len(self._queue) >= self.max_queue:
        raise QueueFull(f"request queue is full ({self.max_queue} waiting)")
      self._queue.append(handle)
      self._cond.notify_all()
    return handle

  def generate(self, request: GenerationRequest, timeout: float | None = None) -> GenerationResult:
    return self.submit(request).result(timeout)

  def stats(self) -> EngineStats:
    with self._cond:
      active = sum(s is not None for s in self._slots)
      return EngineStats(active_slots=active, free_slots=self.max_slots - active, max_slots=self.max_slots,
                         queue_depth=len(self._queue), **self._counters)

  def _wake(self) -> None:
    with self._cond:
      self._cond.notify_all()

  # ------------------------------------------------------------------------------------------- the loop

  def _loop(self) -> None:
    try:
      while True:
        with self._cond:
          if not self._running:
            return
          self._drop_cancelled()
          if not any(self._slots) and not self._queue:
            self._cond.wait(timeout=0.5)
            continue
        self._admit()
        if any(self._slots):
          self._decode_step()
    except BaseException as e:  # a failed step leaves the donated cache unusable: fail everything
      log.exception("generation engine failed")
      with self._cond:
        self._failure = e
        self._running = False
        pending = list(self._queue)
        self._queue.clear()
      for s in self._slots:
        if s is not None:
          s.handle._fail(e)
      for h in pending:
        h._fail(e)
      self._slots = [None] * self.max_slots

  def _drop_cancelled(self) -> None:
    for s in self._slots:
      if s is not None and s.handle.cancelled:
        self._finish(s, "cancelled", None, "")
    for h in [h for h in self._queue if h.cancelled]:
      self._queue.remove(h)
      h._finish_unstarted("cancelled")

  def _admit(self) -> None:
    """Prefills queued requests into free slots: all of them when nothing is decoding, else one per step so
    that running requests keep streaming while a long prompt is prefilled."""
    limit = self.max_slots if not any(self._slots) else 1
    for _ in range(limit):
      with self._cond:
        free = [i for i, s in enumerate(self._slots) if s is None]
        if not free or not self._queue:
          return
        handle = self._queue.popleft()
      self._start(handle, free[0])

  def _start(self, handle: RequestHandle, slot: int) -> None:
    req, p = handle.request, handle.request.sampling
    seed = p.seed if p.seed is not None else int(self._seed_rng.integers(0, 1 << 63))
    detok = None
    if self.tokenizer is not None:
      detok = IncrementalDecoder(self.tokenizer, skip_special_tokens=p.skip_special_tokens)
    rep = (RepetitionDetector(p.repetition_min_span, p.repetition_max_span, p.repetition_min_repeats,
                              p.repetition_min_tokens) if p.repetition_stop else None)
    t = len(req.input_ids)
    s = _Slot(handle, slot, seed, t, 0, [], StopStrings(p.stop), detok, rep, [], [] if p.logprobs else None)
    self._sampling.set_row(slot, p, seed, 0)
    start = time.perf_counter()
    out = self.steps.prefill(slot, req.input_ids, req.images_seq_mask, req.image_features,
                             self._sampling.row(slot), p.top_logprobs > 0)
    self._counters["prefill_seconds"] += time.perf_counter() - start
    self._counters["prompt_tokens"] += t
    with self._cond:
      self._slots[slot] = s
    self._accept(s, int(out.tokens[0]), out, 0)

  def _decode_step(self) -> None:
    n = self.max_slots
    tokens, positions = np.zeros(n, np.int32), np.zeros(n, np.int32)
    banned = np.full((n, MAX_NGRAM_WINDOW), -1, np.int32)
    want_top = False
    for s in self._slots:
      if s is None:
        continue
      p = s.params
      tokens[s.slot], positions[s.slot] = s.last_token, s.next_pos
      self._sampling.step[s.slot] = len(s.generated)
      if p.ngram_size:
        bans = ngram_banned_ids(s.generated, p.ngram_size, p.ngram_window, self.ngram_whitelist)
        banned[s.slot, :len(bans)] = bans
      want_top |= p.top_logprobs > 0
    start = time.perf_counter()
    out = self.steps.decode(tokens, positions, self._sampling, banned, want_top)
    for s in list(self._slots):
      if s is not None:
        s.next_pos += 1
        self._accept(s, int(out.tokens[s.slot]), out, s.slot)
    self._counters["decode_steps"] += 1
    self._counters["decode_seconds"] += time.perf_counter() - start

  # ------------------------------------------------------------------------------------------- per token

  def _accept(self, s: _Slot, token: int, out, row: int) -> None:
    """Records one sampled token of slot `s`, streams it and ends the request when a stop rule says so."""
    p = s.params
    s.generated.append(token)
    s.last_token = token
    self._counters["tokens_generated"] += 1
    finish, reason, text = None, None, ""
    if token == self.eos_id and not p.ignore_eos:
      finish = "stop"
    elif token in p.stop_token_ids:
      finish, reason = "stop", token
    else:
      if s.detok is not None:
        text, matched = s.stops.feed(s.detok.add(token))
        if matched is not None:
          finish, reason = "stop", matched
      if finish is None and s.repetition is not None and s.repetition.add(token):
        finish, reason = "stop", "repetition"
    if finish is None and (len(s.generated) >= p.max_tokens or s.next_pos >= self.max_seq_len):
      finish = "length"
    if finish is not None and not isinstance(reason, str) and s.detok is not None:
      # Not ended by a stop string: flush what the detokenizer and the stop matcher held back.
      tail, matched = s.stops.feed(s.detok.finish())
      text += tail + ("" if matched is not None else s.stops.flush())
      if matched is not None:
        finish, reason = "stop", matched
    lp = top = None
    if s.logprobs is not None:
      lp = float(out.logprob[row])
      top = [(int(i), float(v)) for i, v in zip(out.top_ids[row][:p.top_logprobs],
                                                out.top_logprobs[row][:p.top_logprobs])]
      s.logprobs.append((token, lp, top))
    s.text.append(text)
    event = GenerationEvent(token_id=token, text=text, logprob=lp, top_logprobs=top)
    if finish is None:
      s.handle._push(event)
    else:
      self._finish(s, finish, reason, text, event)

  def _finish(self, s: _Slot, finish: str, reason, text: str, event: GenerationEvent | None = None) -> None:
    with self._cond:
      self._slots[s.slot] = None
    # An idle row must read as greedy, or an all-greedy batch would pay for the sampling branch.
    self._sampling.set_row(s.slot, _IDLE, 0, 0)
    self._counters["requests_finished"] += 1
    result = GenerationResult(
        request_id=s.handle.request.request_id, token_ids=list(s.generated), text="".join(s.text),
        finish_reason=finish, stop_reason=reason, prompt_tokens=len(s.handle.request.input_ids),
        completion_tokens=len(s.generated), logprobs=s.logprobs)
    event = event or GenerationEvent(token_id=None, text=text)
    s.handle._finish(dataclasses.replace(event, finish_reason=finish, stop_reason=reason,
                                         usage=result.usage), result)
