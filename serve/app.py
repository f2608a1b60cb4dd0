"""FastAPI routes: OpenAI chat completions (plain and SSE), models, health/readiness, Prometheus metrics.

Operational rules (issue 5):
  * every error is OpenAI-shaped JSON `{"error": {message, type, param, code}}` with a 4xx for a bad request
    (FastAPI's own validation errors are rewritten into 400s naming the field), never a stack trace;
  * admission is bounded: at most `max_pending` chat requests are in the server (preparing, waiting for a slot
    or generating); one more gets 429 with Retry-After;
  * while draining (SIGTERM, see `serve.__main__`) /ready is 503 and new chat requests get 503, requests
    already admitted finish;
  * a client that goes away (mid-stream or while waiting for a non-streamed answer) cancels its engine
    requests, which frees their slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve import grounding
from serve.metrics import ServerMetrics
from serve.protocol import (APIError, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice,
                            ChoiceLogprobs, ChunkChoice, DeltaMessage, GroundingSpan, ModelCard, ModelList,
                            ResponseMessage, Usage, completion_id, now)
from serve.streams import Backend, ChoiceStream, Finished, PreparedPrompt, TextDelta

log = logging.getLogger("serve")

DISCONNECT_POLL_S = 0.25


@dataclasses.dataclass
class ServerSettings:
  api_key: Optional[str] = None
  max_pending: int = 64  # chat requests admitted at once (slots + queue)
  max_body_bytes: int = 64 * 1024 * 1024
  retry_after_s: int = 1


class ServerState:
  """Admission and drain bookkeeping, touched only from the event loop."""

  def __init__(self, max_pending: int):
    self.max_pending = max_pending
    self.in_flight = 0
    self.draining = False
    self.started = time.time()
    self._idle = asyncio.Event()
    self._idle.set()

  def admit(self, retry_after_s: int) -> None:
    if self.draining:
      raise APIError(503, "the server is shutting down; retry on another replica", type="server_error",
                     code="draining", headers={"Retry-After": str(retry_after_s)})
    if self.in_flight >= self.max_pending:
      raise APIError(429, f"the server is at capacity ({self.max_pending} requests in flight); retry later",
                     type="rate_limit_error", code="server_busy", headers={"Retry-After": str(retry_after_s)})
    self.in_flight += 1
    self._idle.clear()

  def release(self) -> None:
    self.in_flight -= 1
    if self.in_flight == 0:
      self._idle.set()

  async def wait_idle(self, timeout_s: float) -> bool:
    try:
      await asyncio.wait_for(self._idle.wait(), timeout_s)
      return True
    except asyncio.TimeoutError:
      return False


# -------------------------------------------------------------------------------------------------- errors


def _error_response(err: APIError) -> JSONResponse:
  return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
_TYPE_TAGS = ("str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before")


def _param_path(loc: tuple) -> Optional[str]:
  """('body', 'messages', 0, 'content', 'list[...]', 1, 'image_url', 'image_url', 'url') ->
  'messages[0].content[1].image_url.url' (pydantic's union/type tags dropped, discriminator tags deduplicated)."""
  path: list = []
  for part in loc[1:] if loc and loc[0] == "body" else loc:
    if isinstance(part, str) and ("[" in part or part in _TYPE_TAGS):
      continue
    if path and part == path[-1]:
      continue
    path.append(part)
  text = ""
  for part in path:
    text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
  return text or None


def validation_error(exc: RequestValidationError) -> APIError:
  errors = exc.errors()
  if not errors:
    return APIError(400, "invalid request")
  first = errors[0]
  if first.get("type") == "json_invalid":
    return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                    code="invalid_json")
  # The most specific error (longest location) names the field best when a union produced several.
  err = max(errors, key=lambda e: len(e.get("loc", ())))
  param = _param_path(tuple(err.get("loc", ())))
  msg = err.get("msg", "invalid value")
  if msg.startswith("Value error, "):
    msg = msg[len("Value error, "):]
    if param is None and ":" in msg:  # model-level checks prefix their message with the field name
      param = msg.split(":", 1)[0]
  if err.get("type") == "missing" and param is None:
    return APIError(400, "the request body is required", code="missing_body")
  if err.get("type") == "extra_forbidden":
    msg = "unrecognized request argument"
  return APIError(400, f"{param}: {msg}" if param and not msg.startswith(f"{param}:") else msg, param=param,
                  code="invalid_value")


# ---------------------------------------------------------------------------------------- ASGI middleware


class _Edge:
  """Counts finished requests by route and status, and refuses bodies over the size limit with 413."""

  def __init__(self, app, metrics: ServerMetrics, max_body_bytes: int):
    self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    route = scope.get("path", "")
    if route not in ("/v1/chat/completions", "/v1/models"):
      route = "other"
    status = {"code": 500}

    async def send_status(message):
      if message["type"] == "http.response.start":
        status["code"] = message["status"]
      await send(message)

    too_big = f"request body over the limit of {self.max_body_bytes} bytes"
    received = 0

    async def receive_limited():
      # A chunked body has no Content-Length: count what arrives. FastAPI turns any other exception raised
      # while it reads the body into a generic 400; an HTTPException passes through to our handler.
      nonlocal received
      message = await receive()
      received += len(message.get("body", b""))
      if received > self.max_body_bytes:
        raise StarletteHTTPException(413, too_big)
      return message

    length = dict(scope.get("headers", [])).get(b"content-length")
    try:
      if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
        await _error_response(APIError(413, too_big, code=_HTTP_CODES[413]))(scope, receive, send_status)
      else:
        await self.app(scope, receive_limited, send_status)
    finally:
      self.metrics.requests.labels(route=route, status=str(status["code"])).inc()


# --------------------------------------------------------------------------------------------------- app


def create_app(backend: Backend, settings: ServerSettings = ServerSettings(),
               metrics: Optional[ServerMetrics] = None) -> FastAPI:
  metrics = metrics or ServerMetrics()
  state = ServerState(settings.max_pending)
  app = FastAPI(title="dsocr-jax", docs_url=None, redoc_url=None, openapi_url=None)
  app.add_middleware(_Edge, metrics=metrics, max_body_bytes=settings.max_body_bytes)
  app.state.server = state
  app.state.backend = backend
  app.state.metrics = metrics
  metrics.bind_engine(backend.active_slots, backend.queue_depth)
  metrics.in_flight.set_function(lambda: state.in_flight)
  metrics.ready.set_function(lambda: float(backend.is_ready() and not state.draining))

  @app.exception_handler(APIError)
  async def _api_error(_: Request, exc: APIError):
    return _error_response(exc)

  @app.exception_handler(RequestValidationError)
  async def _validation(_: Request, exc: RequestValidationError):
    return _error_response(validation_error(exc))

  @app.exception_handler(StarletteHTTPException)
  async def _http(_: Request, exc: StarletteHTTPException):
    return _error_response(APIError(exc.status_code, str(exc.detail), code=_HTTP_CODES.get(exc.status_code)))

  @app.exception_handler(Exception)
  async def _internal(_: Request, exc: Exception):
    log.exception("internal error")
    return _error_response(APIError(500, f"internal server error ({type(exc).__name__})", type="server_error"))

  def check_auth(request: Request) -> None:
    if settings.api_key is None:
      return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
      raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                     type="authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

  @app.get("/health")
  async def health():
    return {"status": "ok"}

  @app.get("/ready")
  async def ready():
    if state.draining:
      return JSONResponse({"status": "draining"}, status_code=503)
    if not backend.is_ready():
      return JSONResponse({"status": "warming up"}, status_code=503)
    return {"status": "ready", "model": backend.model_name}

  @app.get("/metrics")
  async def prometheus():
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)

  def model_card() -> ModelCard:
    return ModelCard(id=backend.model_name, created=int(state.started), root=backend.model_root)

  @app.get("/v1/models")
  async def list_models(request: Request):
    check_auth(request)
    return ModelList(data=[model_card()]).model_dump()

  @app.get("/v1/models/{model_id:path}")
  async def get_model(model_id: str, request: Request):
    check_auth(request)
    if model_id != backend.model_name:
      raise APIError(404, f"model {model_id!r} does not exist; this server serves {backend.model_name!r}",
                     param="model", code="model_not_found")
    return model_card().model_dump()

  @app.post("/v1/chat/completions")
  async def chat_completions(req: ChatCompletionRequest, request: Request):
    arrival = time.monotonic()
    check_auth(request)
    if req.model is not None and req.model != backend.model_name:
      raise APIError(404, f"model {req.model!r} does not exist; this server serves {backend.model_name!r}",
                     param="model", code="model_not_found")
    if not backend.is_ready():
      raise APIError(503, "the model is still warming up", type="server_error", code="not_ready",
                     headers={"Retry-After": str(settings.retry_after_s)})
    state.admit(settings.retry_after_s)
    streams: list[ChoiceStream] = []
    handed_over = False  # from here on _finish() cancels and releases
    try:
      prepared = await backend.prepare(req)
      metrics.preprocess.observe(prepared.prepare_seconds)
      metrics.prompt_tokens.inc(prepared.prompt_tokens)
      metrics.image_tokens.inc(prepared.num_image_tokens)
      for k in range(req.n):  # appended one by one: if choice k is refused, choices < k get cancelled
        streams.append(backend.generate(prepared, req, k))
      run = _Run(req, prepared, streams, metrics, arrival, backend.model_name)
      handed_over = True
      if req.stream:
        return _SSEResponse(run.sse(), on_close=lambda: _finish(run, state), media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
      try:
        body = await run.complete(request)
      finally:
        _finish(run, state)
      return JSONResponse(body, headers=run.timing_headers())
    finally:
      if not handed_over:
        for s in streams:
          s.cancel()
        state.release()

  return app


def _finish(run: "_Run", state: ServerState) -> None:
  """Runs once when an answer is complete or abandoned: cancels unfinished engine requests, frees admission."""
  if run.closed:
    return
  run.closed = True
  run.cancel_unfinished()
  run.record_latency()
  state.release()


class _SSEResponse(StreamingResponse):
  """A StreamingResponse whose cleanup runs even when the client leaves before the body generator started."""

  def __init__(self, content, *, on_close, **kwargs):
    super().__init__(content, **kwargs)
    self._on_close = on_close

  async def __call__(self, scope, receive, send):
    try:
      await super().__call__(scope, receive, send)
    finally:
      self._on_close()


class _Run:
  """One chat request's choices being generated: collects them into a completion or an SSE stream."""

  def __init__(self, req: ChatCompletionRequest, prepared: PreparedPrompt, streams: list[ChoiceStream],
               metrics: ServerMetrics, arrival: float, model: str):
    self.req, self.prepared, self.streams, self.metrics = req, prepared, streams, metrics
    self.arrival, self.model = arrival, model
    self.id, self.created = completion_id(), now()
    self.finished: list[Optional[Finished]] = [None] * len(streams)
    self.closed = False
    self.server_seconds = 0.0

  # ------------------------------------------------------------------------------------- bookkeeping

  def _on_finished(self, index: int, fin: Finished) -> None:
    self.finished[index] = fin
    self.metrics.completion_tokens.inc(fin.completion_tokens)
    self.metrics.finish_reasons.labels(reason=fin.finish_reason).inc()
    self.metrics.engine_time.observe(fin.engine_seconds)
    if fin.stop_reason == "repetition":
      self.metrics.repetition_stops.inc()

  def cancel_unfinished(self) -> None:
    for stream, fin in zip(self.streams, self.finished):
      if fin is None:
        stream.cancel()
        self.metrics.cancelled.inc()

  def record_latency(self) -> None:
    self.server_seconds = time.monotonic() - self.arrival
    self.metrics.latency.observe(self.server_seconds)
    first = [f.first_token_at for f in self.finished if f is not None and f.first_token_at is not None]
    if first:
      self.metrics.ttft.observe(min(first) - self.arrival)

  def usage(self) -> Usage:
    completion = sum(f.completion_tokens for f in self.finished if f is not None)
    prompt = self.prepared.prompt_tokens
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details={"image_tokens": self.prepared.num_image_tokens})

  def grounding(self, text: str) -> Optional[list[GroundingSpan]]:
    if not self.req.grounding:
      return None
    # Boxes are relative to one original image: the first one when a request carries several.
    size = self.prepared.image_sizes[0] if self.prepared.image_sizes else None
    return [GroundingSpan(**dataclasses.asdict(s)) for s in grounding.parse_grounding(text, size)]

  def timing_headers(self) -> dict[str, str]:
    engine = max((f.engine_seconds for f in self.finished if f is not None), default=0.0)
    return {"X-Engine-Seconds": f"{engine:.6f}", "X-Prepare-Seconds": f"{self.prepared.prepare_seconds:.6f}",
            "X-Server-Seconds": f"{time.monotonic() - self.arrival:.6f}"}

  # ------------------------------------------------------------------------------------ non-streaming

  async def _collect(self, index: int) -> tuple[str, list]:
    texts, logprobs = [], []
    async for event in self.streams[index]:
      if isinstance(event, TextDelta):
        texts.append(event.text)
        logprobs.extend(event.logprobs or [])
      else:
        texts.append(event.tail)
        self._on_finished(index, event)
    return "".join(texts), logprobs

  async def complete(self, request: Request) -> dict:
    gathered = asyncio.gather(*(self._collect(k) for k in range(len(self.streams))))
    while True:
      done, _ = await asyncio.wait({gathered}, timeout=DISCONNECT_POLL_S)
      if done:
        break
      if await request.is_disconnected():
        gathered.cancel()
        with contextlib.suppress(asyncio.CancelledError):
          await gathered
        raise APIError(499, "client disconnected", code="client_closed_request")
    choices = []
    for k, (text, logprobs) in enumerate(gathered.result()):
      fin = self.finished[k]
      choices.append(Choice(
          index=k, message=ResponseMessage(content=text, grounding=self.grounding(text)),
          finish_reason=fin.finish_reason, stop_reason=fin.stop_reason,
          logprobs=ChoiceLogprobs(content=logprobs) if self.req.logprobs else None))
    completion = ChatCompletion(id=self.id, created=self.created, model=self.model, choices=choices,
                                usage=self.usage())
    return completion.model_dump(exclude_none=True)

  # ---------------------------------------------------------------------------------------- streaming

  def _chunk(self, choices: list[ChunkChoice], usage: Optional[Usage] = None) -> str:
    chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)
    return f"data: {json.dumps(chunk.model_dump(exclude_none=True), ensure_ascii=False)}\n\n"

  async def _pump(self, index: int, queue: asyncio.Queue) -> None:
    try:
      async for event in self.streams[index]:
        await queue.put((index, event))
    except Exception as e:  # surfaced to the client as an error event, the other choices go on
      log.exception("choice %d failed", index)
      await queue.put((index, e))
    await queue.put((index, None))

  async def sse(self) -> AsyncIterator[str]:
    req = self.req
    queue: asyncio.Queue = asyncio.Queue()
    pumps = [asyncio.create_task(self._pump(k, queue)) for k in range(len(self.streams))]
    texts = [[] for _ in self.streams]
    try:
      yield self._chunk([ChunkChoice(index=k, delta=DeltaMessage(role="assistant", content=""))
                         for k in range(len(self.streams))])
      open_streams = len(self.streams)
      while open_streams:
        index, event = await queue.get()
        if event is None:
          open_streams -= 1
        elif isinstance(event, Exception):
          err = APIError(500, f"generation failed ({type(event).__name__})", type="server_error")
          yield f"data: {json.dumps(err.body())}\n\n"
        elif isinstance(event, TextDelta):
          if event.text or event.logprobs:
            texts[index].append(event.text)
            lp = ChoiceLogprobs(content=event.logprobs) if req.logprobs else None
            yield self._chunk([ChunkChoice(index=index, delta=DeltaMessage(content=event.text), logprobs=lp)])
        else:
          self._on_finished(index, event)
          texts[index].append(event.tail)
          delta = DeltaMessage(content=event.tail or None, grounding=self.grounding("".join(texts[index])))
          yield self._chunk([ChunkChoice(index=index, delta=delta, finish_reason=event.finish_reason,
                                         stop_reason=event.stop_reason)])
      if req.stream_options is not None and req.stream_options.include_usage:
        yield self._chunk([], usage=self.usage())
      yield "data: [DONE]\n\n"
    finally:
      for p in pumps:
        p.cancel()
