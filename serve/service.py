"""The model side of the server: chat request -> images -> preprocess -> vision -> prompt -> engine streams.

`OCRService` implements `serve.streams.Backend` on the real model and `dsocr_jax.generate.engine.Engine`.
Image decoding, preprocessing and the vision encoder run on one dedicated worker thread: they are CPU/accelerator
bound and must not block the event loop, and running them one at a time keeps a burst of uploads from
oversubscribing the cores the decode loop needs. Engine events arrive through the handle's asyncio iterator.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import time
from typing import Optional

import numpy as np

from dsocr_jax.generate.engine import Engine, GenerationRequest, QueueFull, SamplingParams
from dsocr_jax.image.decode import DEFAULT_MAX_PIXELS, open_image
from dsocr_jax.image.preprocess import PreprocessedImage, preprocess
from dsocr_jax.text.prompt import build_prompt
from dsocr_jax.text.tokenizer import Tokenizer
from serve import images as image_urls
from serve.chat_prompt import ChatPrompt, ImageRef, build_chat_prompt
from serve.protocol import APIError, ChatCompletionRequest, TokenLogprob, TopLogprob
from serve.streams import Finished, PreparedPrompt, TextDelta

log = logging.getLogger("serve")

# Official generation defaults (spec 5.6): greedy, no-repeat n-gram 30 over a window of 90.
DEFAULT_NGRAM_SIZE = 30
DEFAULT_NGRAM_WINDOW = 90
MIN_CROPS = 2  # official `dynamic_preprocess` lower bound (spec 4.3)


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
  default_mode: str = "gundam"
  default_max_crops: int = 6  # vLLM default (spec 4.3); requests may ask for up to 9 with `max_crops`
  max_images: int = 8  # per request
  max_image_pixels: int = DEFAULT_MAX_PIXELS
  fetch: image_urls.FetchLimits = image_urls.FetchLimits()


def _param_of(message: str) -> Optional[str]:
  """Our library errors start with the field path ("messages[0].content: ..."); use it as the error param."""
  head = message.split(":", 1)[0]
  return head if head and " " not in head else None


class EngineChoice:
  """One choice: adapts an engine `RequestHandle` to the `ChoiceStream` the routes consume."""

  def __init__(self, handle, submitted_at: float, token_text):
    self.handle, self.submitted_at, self._token_text = handle, submitted_at, token_text

  def cancel(self) -> None:
    self.handle.cancel()

  def _logprobs(self, event) -> Optional[list[TokenLogprob]]:
    if event.logprob is None or event.token_id is None:
      return None
    top = [TopLogprob(token=self._token_text(i), logprob=lp, bytes=list(self._token_text(i).encode()))
           for i, lp in (event.top_logprobs or [])]
    text = self._token_text(event.token_id)
    return [TokenLogprob(token=text, logprob=event.logprob, bytes=list(text.encode()), top_logprobs=top)]

  async def __aiter__(self):
    first_token_at = None
    async for event in self.handle:
      if event.token_id is not None and first_token_at is None:
        first_token_at = time.monotonic()
      logprobs = self._logprobs(event)
      if event.finish_reason is None or event.text or logprobs:
        yield TextDelta(event.text, int(event.token_id is not None), logprobs)
      if event.finish_reason is not None:
        yield Finished(finish_reason=event.finish_reason, stop_reason=event.stop_reason,
                       completion_tokens=event.usage.completion_tokens if event.usage else 0,
                       engine_seconds=time.monotonic() - self.submitted_at, first_token_at=first_token_at)


class OCRService:
  """`serve.streams.Backend` on a DeepseekOCR model and a running engine."""

  def __init__(self, model, tokenizer: Tokenizer, engine: Engine, *, model_name: str, model_root: str,
               config: ServiceConfig = ServiceConfig()):
    self.model, self.tokenizer, self.engine = model, tokenizer, engine
    self.model_name, self.model_root, self.config = model_name, model_root, config
    self.max_slots = engine.max_slots
    self._ready = False
    self._vision = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsocr-vision")
    self._token_text = functools.lru_cache(maxsize=65536)(lambda i: tokenizer.decode([i]))

  # ----------------------------------------------------------------------------------------- lifecycle

  def start(self, vision_modes: tuple[str, ...] = ()) -> None:
    """Compiles the engine's steps and the vision encoder's global view for `vision_modes` (tile shapes compile
    on first use), starts the engine thread, then reports ready."""
    from PIL import Image
    t0 = time.monotonic()
    self.engine.warmup()
    for mode in vision_modes:
      pre = preprocess(Image.new("RGB", (64, 64), (200, 200, 200)), mode)  # <= 640 px: no tiles
      np.asarray(self.model.image_features(pre.global_view, None, pre.spatial_crop))
    self.engine.start()
    log.info("warm-up done in %.1f s (prefill buckets %s, vision modes %s)", time.monotonic() - t0,
             list(self.engine.steps.buckets), list(vision_modes))
    self._ready = True

  def is_ready(self) -> bool:
    return self._ready

  def close(self) -> None:
    """Stops the engine (requests still running end as cancelled) and the vision worker."""
    self._ready = False
    self.engine.stop()
    self._vision.shutdown(wait=False, cancel_futures=True)

  def active_slots(self) -> int:
    return self.engine.stats().active_slots

  def queue_depth(self) -> int:
    return self.engine.stats().queue_depth

  # ------------------------------------------------------------------------------------------- prepare

  def _mode_for(self, req: ChatCompletionRequest, ref: ImageRef) -> str:
    if req.mode is not None:
      return req.mode
    return "tiny" if ref.detail == "low" else self.config.default_mode

  def _encode(self, data: list[bytes], refs: list[ImageRef], req: ChatCompletionRequest,
              chat: ChatPrompt) -> tuple[list[PreprocessedImage], Optional[np.ndarray], object]:
    """Worker thread: decode and preprocess every image, build the token prompt, check its length, and only
    then run the vision encoder (a prompt that cannot fit costs no encoder time)."""
    max_crops = req.max_crops or self.config.default_max_crops
    pres = []
    for raw, ref in zip(data, refs):
      try:
        img = open_image(raw, max_pixels=self.config.max_image_pixels)
        pres.append(preprocess(img, self._mode_for(req, ref), min_crops=MIN_CROPS, max_crops=max_crops))
      except ValueError as e:
        status = 413 if "exceeds" in str(e) else 400
        raise APIError(status, f"{ref.param}: {e}", param=ref.param, code="invalid_image") from None
    try:
      prompt = build_prompt(chat.text, pres, self.tokenizer)
    except ValueError as e:
      raise APIError(400, f"messages: {e}", param="messages") from None
    max_prompt = min(self.engine.steps.buckets[-1], self.engine.max_seq_len - 1)
    if len(prompt) > max_prompt:
      raise APIError(400, f"messages: the prompt is {len(prompt)} tokens ({prompt.num_image_tokens} of them for "
                     f"images); this server accepts at most {max_prompt} (try a smaller mode or max_crops)",
                     param="messages", code="context_length_exceeded")
    features = [np.asarray(self.model.image_features(p.global_view, p.tiles if p.num_tiles else None,
                                                     p.spatial_crop)) for p in pres]
    return pres, (np.concatenate(features, axis=0) if features else None), prompt

  async def prepare(self, req: ChatCompletionRequest) -> PreparedPrompt:
    start = time.monotonic()
    try:
      chat = build_chat_prompt(req)
    except ValueError as e:
      raise APIError(400, str(e), param=_param_of(str(e))) from None
    if len(chat.images) > self.config.max_images:
      raise APIError(400, f"messages: {len(chat.images)} images in one request; at most {self.config.max_images}",
                     param="messages")

    async def fetch(ref: ImageRef) -> bytes:
      try:
        return await image_urls.load_image_bytes(ref.url, self.config.fetch)
      except image_urls.ImageFetchError as e:
        raise APIError(e.status, f"{ref.param}: {e}", param=ref.param, code=e.code) from None

    data = await asyncio.gather(*(fetch(ref) for ref in chat.images))
    loop = asyncio.get_running_loop()
    pres, features, prompt = await loop.run_in_executor(self._vision, self._encode, data, chat.images, req, chat)
    return PreparedPrompt(
        input_ids=prompt.input_ids, images_seq_mask=prompt.images_seq_mask if pres else None,
        image_features=features, image_sizes=[p.original_size for p in pres],
        num_image_tokens=prompt.num_image_tokens, prepare_seconds=time.monotonic() - start)

  # ------------------------------------------------------------------------------------------ generate

  def sampling_params(self, req: ChatCompletionRequest, prompt_tokens: int, index: int) -> SamplingParams:
    room = self.engine.max_seq_len - prompt_tokens
    limit = req.completion_limit
    return SamplingParams(
        # Greedy unless asked: the official OCR runs all use temperature 0 (spec 5.6), unlike OpenAI's 1.0.
        temperature=0.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        frequency_penalty=req.frequency_penalty or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        # Each of the n choices is its own engine request; offset the seed so seeded choices differ.
        seed=None if req.seed is None else req.seed + index,
        max_tokens=max(1, min(limit, room) if limit is not None else room),
        stop=tuple(req.stop_list),
        logprobs=req.logprobs,
        top_logprobs=req.top_logprobs or 0,
        ngram_size=DEFAULT_NGRAM_SIZE if req.ngram_size is None else req.ngram_size,
        ngram_window=DEFAULT_NGRAM_WINDOW if req.ngram_window is None else req.ngram_window,
        repetition_stop=True if req.repetition_stop is None else req.repetition_stop,
        ignore_eos=req.ignore_eos,
        skip_special_tokens=req.skip_special_tokens)

  def generate(self, prepared: PreparedPrompt, req: ChatCompletionRequest, index: int) -> EngineChoice:
    request = GenerationRequest(
        input_ids=np.asarray(prepared.input_ids, np.int32),
        sampling=self.sampling_params(req, prepared.prompt_tokens, index),
        images_seq_mask=prepared.images_seq_mask, image_features=prepared.image_features)
    submitted = time.monotonic()
    try:
      handle = self.engine.submit(request)
    except ValueError as e:
      raise APIError(400, str(e), param=_param_of(str(e))) from None
    except QueueFull as e:
      raise APIError(429, f"the generation queue is full ({e}); retry later", type="rate_limit_error",
                     code="server_busy", headers={"Retry-After": "1"}) from None
    except RuntimeError as e:
      raise APIError(503, f"the generation engine is unavailable: {e}", type="server_error",
                     code="engine_unavailable") from None
    return EngineChoice(handle, submitted, self._token_text)
