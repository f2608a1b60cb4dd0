"""The HTTP layer (serve.app) against a scripted fake backend, in process: wire format, errors, auth, admission,
drain. The real model behind the same routes is tested by tests/test_server.py with a server process."""

import asyncio
import json

import httpx
import pytest

from serve.app import ServerSettings, create_app
from serve.chat_prompt import build_chat_prompt
from serve.protocol import APIError
from serve.streams import Finished, PreparedPrompt, TextDelta

SCRIPT = ["<|ref|>title<|/ref|><|det|>[[0, 0, 999, 499]]<|/det|>", "Hello", " world"]


class FakeStream:

  def __init__(self, backend, pieces, gate):
    self.backend, self.pieces, self.gate = backend, pieces, gate
    self.cancelled = False

  async def __aiter__(self):
    self.backend.active += 1
    try:
      if self.gate is not None:
        await self.gate.wait()
      for p in self.pieces:
        await asyncio.sleep(0)
        yield TextDelta(p, 1)
      yield Finished("length", None, len(self.pieces), engine_seconds=0.01, first_token_at=None)
    finally:
      self.backend.active -= 1

  def cancel(self):
    self.cancelled = True


class FakeBackend:
  model_name = "fake-ocr"
  model_root = "scripted test backend"
  max_slots = 2

  def __init__(self):
    self.active = 0
    self.ready = True
    self.gate = None
    self.streams = []

  def is_ready(self):
    return self.ready

  async def prepare(self, req):
    try:
      cp = build_chat_prompt(req)
    except ValueError as e:
      raise APIError(400, str(e))
    ids = list(range(3 + len(cp.text)))
    return PreparedPrompt(ids, None, None, [(2000, 1000)] * len(cp.images), 7 * len(cp.images), 0.0)

  def generate(self, prepared, req, index):
    s = FakeStream(self, SCRIPT[:(req.completion_limit or 3)], self.gate)
    self.streams.append(s)
    return s

  def active_slots(self):
    return self.active

  def queue_depth(self):
    return 0


def _client(backend, **settings):
  app = create_app(backend, ServerSettings(**settings))
  return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test"), app


MSG = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}},
                                    {"type": "text", "text": "Free OCR."}]}]


def run(coro):
  return asyncio.run(coro)


def test_completion_shape_usage_n_and_grounding():
  async def go():
    client, _ = _client(FakeBackend())
    async with client:
      r = await client.post("/v1/chat/completions", json={"model": "fake-ocr", "messages": MSG, "n": 2,
                                                            "grounding": True})
      return r
  r = run(go())
  assert r.status_code == 200, r.text
  body = r.json()
  assert body["object"] == "chat.completion" and body["model"] == "fake-ocr" and body["id"].startswith("chatcmpl-")
  assert [c["index"] for c in body["choices"]] == [0, 1]
  c = body["choices"][0]
  assert c["message"]["content"] == "".join(SCRIPT) and c["finish_reason"] == "length"
  assert c["message"]["grounding"] == [{"label": "title", "boxes": [[0, 0, 2000, 499]],
                                        "boxes_normalized": [[0, 0, 999, 499]]}]
  # prompt counted once, completion tokens summed over choices.
  assert body["usage"]["prompt_tokens"] == 3 + len("<image>\nFree OCR.")
  assert body["usage"]["completion_tokens"] == 6
  assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 6
  assert body["usage"]["prompt_tokens_details"] == {"image_tokens": 7}
  assert float(r.headers["x-engine-seconds"]) == pytest.approx(0.01)


def test_sse_stream_format():
  async def go():
    client, _ = _client(FakeBackend())
    async with client:
      return await client.post("/v1/chat/completions", json={"messages": MSG, "stream": True,
                                                             "stream_options": {"include_usage": True}})
  r = run(go())
  assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
  events = [line[len("data: "):] for line in r.text.split("\n\n") if line]
  assert events[-1] == "[DONE]"
  chunks = [json.loads(e) for e in events[:-1]]
  assert all(c["object"] == "chat.completion.chunk" for c in chunks)
  assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
  content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
  assert content == "".join(SCRIPT)
  assert chunks[-2]["choices"][0]["finish_reason"] == "length"
  assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": MSG, "temperature": 7}, "temperature"),
    ({"messages": MSG, "max_tokens": -1}, "max_tokens"),
    ({"messages": MSG, "mode": "huge"}, "mode"),
    ({"messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": MSG, "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": MSG, "frobnicate": 1}, "frobnicate"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
])
def test_validation_errors_are_openai_400s_naming_the_field(body, param):
  async def go():
    client, _ = _client(FakeBackend())
    async with client:
      bad = await client.post("/v1/chat/completions", json=body)
      good = await client.post("/v1/chat/completions", json={"messages": MSG})
      return bad, good
  bad, good = run(go())
  assert bad.status_code == 400, bad.text
  err = bad.json()["error"]
  assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
  if param == "response_format":
    assert "json_object" in err["message"] and "not supported" in err["message"]
  assert good.status_code == 200


def test_malformed_json_unknown_route_and_model():
  async def go():
    client, _ = _client(FakeBackend())
    async with client:
      return (await client.post("/v1/chat/completions", content=b"{not json",
                                headers={"content-type": "application/json"}),
              await client.get("/v1/nothing"),
              await client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MSG}),
              await client.get("/v1/models"))
  bad_json, no_route, no_model, models = run(go())
  assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
  assert no_route.status_code == 404 and "error" in no_route.json()
  assert no_model.status_code == 404 and no_model.json()["error"]["param"] == "model"
  assert models.json()["data"][0]["id"] == "fake-ocr"


def test_body_size_limit_is_413():
  async def go():
    client, _ = _client(FakeBackend(), max_body_bytes=1000)
    async with client:
      return await client.post("/v1/chat/completions", json={"messages": MSG, "user": "x" * 2000})
  r = run(go())
  assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_chunked_body_over_the_limit_is_413():
  async def chunks():
    for _ in range(4):
      yield b" " * 400  # no Content-Length: the size is counted as the body arrives

  async def go():
    client, _ = _client(FakeBackend(), max_body_bytes=1000)
    async with client:
      return await client.post("/v1/chat/completions", content=chunks(),
                               headers={"content-type": "application/json"})
  r = run(go())
  assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_api_key():
  async def go():
    client, _ = _client(FakeBackend(), api_key="sekret")
    async with client:
      return (await client.post("/v1/chat/completions", json={"messages": MSG}),
              await client.post("/v1/chat/completions", json={"messages": MSG},
                                headers={"Authorization": "Bearer wrong"}),
              await client.post("/v1/chat/completions", json={"messages": MSG},
                                headers={"Authorization": "Bearer sekret"}),
              await client.get("/health"), await client.get("/v1/models"))
  none, wrong, right, health, models = run(go())
  assert none.status_code == 401 and none.json()["error"]["type"] == "authentication_error"
  assert wrong.status_code == 401
  assert right.status_code == 200
  assert health.status_code == 200 and models.status_code == 401


def test_admission_queue_full_gives_429_and_drain_gives_503():
  async def go():
    backend = FakeBackend()
    backend.gate = asyncio.Event()
    client, app = _client(backend, max_pending=1)
    async with client:
      first = asyncio.create_task(client.post("/v1/chat/completions", json={"messages": MSG}))
      while app.state.server.in_flight == 0:
        await asyncio.sleep(0.01)
      busy = await client.post("/v1/chat/completions", json={"messages": MSG})
      app.state.server.draining = True
      ready = await client.get("/ready")
      draining = await client.post("/v1/chat/completions", json={"messages": MSG})
      backend.gate.set()
      done = await first
      metrics = await client.get("/metrics")
      return busy, ready, draining, done, metrics, app.state.server.in_flight
  busy, ready, draining, done, metrics, in_flight = run(go())
  assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
  assert busy.json()["error"]["code"] == "server_busy"
  assert ready.status_code == 503 and draining.status_code == 503
  assert done.status_code == 200  # admitted before the drain: it finishes
  assert in_flight == 0
  assert 'dsocr_requests_total{route="/v1/chat/completions",status="429"} 1.0' in metrics.text


def test_not_ready_is_503():
  async def go():
    backend = FakeBackend()
    backend.ready = False
    client, _ = _client(backend)
    async with client:
      return await client.get("/ready"), await client.post("/v1/chat/completions", json={"messages": MSG})
  ready, chat = run(go())
  assert ready.status_code == 503 and chat.status_code == 503
