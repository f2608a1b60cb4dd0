"""`python -m serve` without --checkpoint (the embedded random tiny model), no API key, and the SIGTERM drain.

The drain test stops this module's server, so it runs last."""

import os
import threading
import time

import httpx
import openai
import pytest

from conftest import GOLDEN_DIR
from serve.process import ServerProcess, data_uri

IMAGE = os.path.join(GOLDEN_DIR, "images", "small_500x400.png")


@pytest.fixture(scope="module")
def server():
  proc = ServerProcess(["--max-seq-len", "2048", "--prefill-buckets", "128", "--max-batch", "2",
                        "--default-mode", "tiny", "--warmup-modes", "tiny", "--drain-timeout", "60"])
  try:
    yield proc
  finally:
    proc.stop()


def _body(**kw):
  return dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(IMAGE)}},
                                                     {"type": "text", "text": "Free OCR."}]}], **kw)


def test_embedded_model_is_announced_and_serves_without_a_key(server):
  client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
  (model,) = client.models.list().data
  assert model.id == "dsocr-random-tiny"
  assert "random" in model.model_extra["root"]
  r = client.chat.completions.create(model="dsocr-random-tiny", max_tokens=5, extra_body={"ignore_eos": True},
                                     messages=_body()["messages"])
  # BOS + 73 Tiny-mode placeholders (8*9 + 1, spec 4.1) + "\nFree OCR." as 10 byte tokens.
  assert r.usage.prompt_tokens == 1 + 73 + 10
  assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
  assert isinstance(r.choices[0].message.content, str)


def test_detail_low_maps_to_tiny_and_n_choices(server):
  body = _body(max_tokens=3, n=2, seed=7, temperature=1.0, ignore_eos=True)
  body["messages"][0]["content"][0]["image_url"]["detail"] = "low"
  r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
  assert r.status_code == 200, r.text
  out = r.json()
  assert [c["index"] for c in out["choices"]] == [0, 1]
  assert out["usage"]["prompt_tokens"] == 84 and out["usage"]["completion_tokens"] == 6


def test_sigterm_drains_in_flight_requests_then_exits_0(server):
  lines, errors = [], []

  def stream():
    try:
      with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120,
                        json=_body(stream=True, max_tokens=1500, ignore_eos=True, ngram_size=0,
                                   repetition_stop=False)) as r:
        for line in r.iter_lines():
          if line:
            lines.append(line)
    except Exception as e:  # reported by the assertions below
      errors.append(e)

  t = threading.Thread(target=stream)
  t.start()
  deadline = time.monotonic() + 60
  while len(lines) < 3:
    assert time.monotonic() < deadline and t.is_alive(), (errors, server.output())
    time.sleep(0.05)
  server.terminate()
  time.sleep(0.5)
  ready = httpx.get(server.url + "/ready", timeout=10)
  refused = httpx.post(server.url + "/v1/chat/completions", json=_body(max_tokens=2), timeout=10)
  streaming_during_checks = t.is_alive()
  t.join(120)
  assert streaming_during_checks, "the stream ended before the drain could be observed"
  assert ready.status_code == 503 and ready.json()["status"] == "draining"
  assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
  assert not errors and lines[-1] == "data: [DONE]", (errors, lines[-3:])
  assert '"finish_reason":"length"' in lines[-2].replace(" ", "")
  assert server.proc.wait(60) == 0, server.output()
