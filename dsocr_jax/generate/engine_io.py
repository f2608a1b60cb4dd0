"""What goes into and out of the engine: requests, streamed events, results, and the per-request handle.

`RequestHandle` is written by the engine thread and read by one consumer, either blocking (`for event in
handle`, `result()`) or from asyncio (`async for event in handle`): events are kept in a lock-guarded deque and
a waiter (a threading.Event, or an asyncio future resolved with `call_soon_threadsafe`) is woken per event, so
no thread is parked per asyncio stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import uuid
from collections import deque
from typing import Callable

import numpy as np

from dsocr_jax.config import DecoderConfig
from dsocr_jax.generate.sampling import SamplingParams


class QueueFull(RuntimeError):
  """The engine's bounded request queue is full (a server answers 429/503)."""


def new_request_id() -> str:
  return "req-" + uuid.uuid4().hex


@dataclasses.dataclass
class GenerationRequest:
  """A tokenized prompt. `images_seq_mask` [T] marks the positions replaced, in order, by the rows of
  `image_features` [N, hidden] (N = mask count); both None for a text-only prompt."""
  input_ids: np.ndarray
  sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
  images_seq_mask: np.ndarray | None = None
  image_features: np.ndarray | None = None
  request_id: str = dataclasses.field(default_factory=new_request_id)


@dataclasses.dataclass(frozen=True)
class Usage:
  prompt_tokens: int
  completion_tokens: int

  @property
  def total_tokens(self) -> int:
    return self.prompt_tokens + self.completion_tokens


@dataclasses.dataclass(frozen=True)
class GenerationEvent:
  """One generated token (token_id None only for a cancellation without a new token)."""
  token_id: int | None
  text: str  # new text since the previous event (may be empty: incomplete UTF-8, held-back stop prefix)
  logprob: float | None = None
  top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), best first
  finish_reason: str | None = None  # set on the last event only
  stop_reason: int | str | None = None
  usage: Usage | None = None  # set on the last event only


@dataclasses.dataclass(frozen=True)
class GenerationResult:
  request_id: str
  token_ids: list[int]
  text: str
  finish_reason: str
  stop_reason: int | str | None
  prompt_tokens: int
  completion_tokens: int
  logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None  # per token: (id, logprob, top list)

  @property
  def usage(self) -> Usage:
    return Usage(self.prompt_tokens, self.completion_tokens)


class RequestHandle:
  """The caller's side of one request: stream its events, wait for its result, or cancel it."""

  def __init__(self, request: GenerationRequest, wake_engine: Callable[[], None]):
    self.request = request
    self._wake_engine = wake_engine
    self._lock = threading.Lock()
    self._events: deque[GenerationEvent] = deque()
    self._done = threading.Event()
    self._result: GenerationResult | None = None
    self._error: BaseException | None = None
    self._waiters: list[Callable[[], None]] = []  # called (from the engine thread) when something arrives
    self.cancelled = False

  @property
  def request_id(self) -> str:
    return self.request.request_id

  @property
  def done(self) -> bool:
    return self._done.is_set()

  def cancel(self) -> None:
    """Asks the engine to end this request; its slot is freed before the next decode step."""
    self.cancelled = True
    self._wake_engine()

  # ---------------------------------------------------------------------------------- engine side

  def _push(self, event: GenerationEvent | None, last: bool = False) -> None:
    with self._lock:
      if event is not None:
        self._events.append(event)
      if last:
        self._done.set()
      waiters, self._waiters = self._waiters, []
    for wake in waiters:
      wake()

  def _finish(self, event: GenerationEvent, result: GenerationResult) -> None:
    self._result = result
    self._push(event, last=True)

  def _finish_unstarted(self, finish_reason: str) -> None:
    result = GenerationResult(self.request_id, [], "", finish_reason, None, len(self.request.input_ids), 0, None)
    self._finish(GenerationEvent(None, "", finish_reason=finish_reason, usage=result.usage), result)

  def _fail(self, error: BaseException) -> None:
    self._error = error
    self._push(None, last=True)

  # ---------------------------------------------------------------------------------- consumer side

  def _take(self) -> tuple[GenerationEvent | None, bool]:
    """(next event or None, whether the stream is over). Caller holds the lock."""
    if self._events:
      return self._events.popleft(), False
    if self._done.is_set():
      if self._error is not None:
        raise RuntimeError(f"generation failed: {self._error!r}") from self._error
      return None, True
    return None, False

  def __iter__(self):
    while True:
      with self._lock:
        event, over = self._take()
      if over:
        return
      if event is not None:
        yield event
        continue
      arrived = threading.Event()
      with self._lock:
        if not self._events and not self._done.is_set():
          self._waiters.append(arrived.set)
        else:
          arrived.set()
      arrived.wait()

  def __aiter__(self):
    return self._aiter()

  async def _aiter(self):
    loop = asyncio.get_running_loop()
    while True:
      with self._lock:
        event, over = self._take()
        fut = None
        if event is None and not over:
          fut = loop.create_future()
          self._waiters.append(_async_waker(loop, fut))
      if over:
        return
      if event is not None:
        yield event
      else:
        await fut

  def result(self, timeout: float | None = None) -> GenerationResult:
    """Blocks until the request ends; the result does not depend on whether the events were consumed."""
    if not self._done.wait(timeout):
      raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
    if self._error is not None:
      raise RuntimeError(f"generation failed: {self._error!r}") from self._error
    return self._result


def _resolve(fut: asyncio.Future) -> None:
  if not fut.done():
    fut.set_result(None)


def _async_waker(loop: asyncio.AbstractEventLoop, fut: asyncio.Future) -> Callable[[], None]:
  def wake():
    try:
      loop.call_soon_threadsafe(_resolve, fut)
    except RuntimeError:  # the consumer's event loop has been closed: nobody is listening any more
      pass
  return wake


def validate_request(req: GenerationRequest, cfg: DecoderConfig, max_seq_len: int, max_prompt: int, *,
                     has_tokenizer: bool) -> None:
  """Checks a request against the engine's limits; ValueError names the field. Normalises arrays in place."""
  if not isinstance(req.sampling, SamplingParams):
    raise ValueError(f"sampling: expected SamplingParams, got {type(req.sampling).__name__}")
  req.sampling.validate(cfg.vocab_size)
  if req.sampling.stop and not has_tokenizer:
    raise ValueError("stop: stop strings need an engine with a tokenizer")
  ids = np.asarray(req.input_ids)
  if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"input_ids: expected a non-empty 1-D integer array, got shape {ids.shape} {ids.dtype}")
  if ids.min() < 0 or ids.max() >= cfg.vocab_size:
    raise ValueError(f"input_ids: ids must lie in [0, {cfg.vocab_size})")
  if len(ids) > max_prompt or len(ids) >= max_seq_len:
    raise ValueError(f"input_ids: prompt of {len(ids)} tokens is too long (at most {min(max_prompt, max_seq_len - 1)})")
  req.input_ids = ids.astype(np.int32)
  if (req.images_seq_mask is None) != (req.image_features is None):
    raise ValueError("images_seq_mask: give both images_seq_mask and image_features, or neither")
  if req.images_seq_mask is not None:
    mask = np.asarray(req.images_seq_mask)
    feats = np.asarray(req.image_features)
    if mask.shape != ids.shape or mask.dtype != np.bool_:
      raise ValueError(f"images_seq_mask: expected a bool array of shape {ids.shape}, got {mask.shape} {mask.dtype}")
    if feats.ndim != 2 or feats.shape[1] != cfg.hidden_size:
      raise ValueError(f"image_features: expected shape [N, {cfg.hidden_size}], got {feats.shape}")
    if int(mask.sum()) != feats.shape[0]:
      raise ValueError(f"image_features: {feats.shape[0]} rows for {int(mask.sum())} image positions in the mask")
    req.images_seq_mask, req.image_features = mask, feats
