"""A real `python -m serve` process on the golden checkpoint, driven by the real openai client.

One server for the module (started with --api-key, so every request here also checks auth-on). The golden
continuation was produced greedily without n-gram blocking or a loop stop, so requests turn both off
(`ngram_size=0`, `repetition_stop=false`) and ask for temperature 0 and the golden 32 tokens.
"""

import concurrent.futures
import io
import json
import os
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from conftest import GOLDEN_DIR, case_id, golden_cases
from dsocr_jax.text.tokenizer import Tokenizer
from serve.process import ServerProcess, data_uri

API_KEY = "test-key-123"
CASES = golden_cases()
MAX_IMAGE_PIXELS = 2_000_000  # the golden images are <= 1.08 MP; the over-limit test sends 2.25 MP


@pytest.fixture(scope="module")
def server():
  proc = ServerProcess(["--checkpoint", GOLDEN_DIR, "--max-seq-len", "1024", "--prefill-buckets", "1024",
                        "--warmup-modes", "base",
                        "--max-batch", "4", "--api-key", API_KEY, "--max-image-pixels", str(MAX_IMAGE_PIXELS)])
  try:
    yield proc
  finally:
    code = proc.stop()
  assert code == 0, "an idle server must exit 0 on SIGTERM"


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def golden_tokenizer():
  return Tokenizer.from_checkpoint(GOLDEN_DIR)


def _case(path):
  d = np.load(path)
  prompt = str(d["prompt"])
  assert prompt.startswith("<image>\n")
  return dict(image=os.path.join(GOLDEN_DIR, str(d["image_file"])), text=prompt[len("<image>\n"):],
              mode=str(d["mode"]), max_crops=int(d["max_crops"]), input_ids=d["input_ids"], gen_ids=d["gen_ids"])


def _request(case, **kw):
  return dict(
      model="golden", temperature=0, max_tokens=len(case["gen_ids"]),
      messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(case["image"])}},
                                             {"type": "text", "text": case["text"]}]}],
      extra_body={"mode": case["mode"], "max_crops": case["max_crops"], "ngram_size": 0, "repetition_stop": False},
      **kw)


def _expected_text(case, tok):
  ids = [int(i) for i in case["gen_ids"]]
  assert tok.eos_id not in ids, "golden continuations run without an EOS stop; an EOS here would end the request"
  return tok.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("path", CASES, ids=[case_id(p) for p in CASES])
def test_golden_case_plain_and_streamed(client, golden_tokenizer, path):
  case = _case(path)
  expected = _expected_text(case, golden_tokenizer)
  r = client.chat.completions.create(**_request(case))
  assert r.choices[0].message.content == expected
  assert r.choices[0].finish_reason == "length"
  assert r.usage.prompt_tokens == len(case["input_ids"])
  assert r.usage.completion_tokens == len(case["gen_ids"])
  assert r.usage.total_tokens == len(case["input_ids"]) + len(case["gen_ids"])
  assert r.model == "golden" and r.object == "chat.completion"

  chunks = list(client.chat.completions.create(**_request(case, stream=True,
                                                          stream_options={"include_usage": True})))
  assert chunks[0].choices[0].delta.role == "assistant"
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert text == expected
  finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
  assert finals == ["length"]
  assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(case["input_ids"])


def test_golden_eight_concurrent_requests(client, golden_tokenizer):
  # The two shortest prompts (cheapest vision), alternating: 8 requests on 4 slots, so some wait in the queue.
  shortest = sorted(CASES, key=lambda p: len(np.load(p)["input_ids"]))[:2]
  cases = [_case(shortest[i % 2]) for i in range(8)]
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    results = list(pool.map(lambda c: client.chat.completions.create(**_request(c)), cases))
  for case, r in zip(cases, results):
    assert r.choices[0].message.content == _expected_text(case, golden_tokenizer)
    assert r.usage.prompt_tokens == len(case["input_ids"])


def _png(width, height) -> bytes:
  buf = io.BytesIO()
  Image.new("L", (width, height), 255).save(buf, format="PNG")
  return buf.getvalue()


def _bad_requests():
  case = _case(CASES[0])
  good = _request(case)
  body = dict(good["extra_body"], **{k: v for k, v in good.items() if k != "extra_body"})
  import base64

  def with_url(url):
    return dict(body, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                             {"type": "text", "text": "Free OCR."}]}])
  not_image = "data:image/png;base64," + base64.b64encode(b"this is not an image at all").decode()
  too_big = "data:image/png;base64," + base64.b64encode(_png(1500, 1500)).decode()
  return [
      ("malformed json", b'{"messages": [', 400),
      ("missing messages", {k: v for k, v in body.items() if k != "messages"}, 400),
      ("bad base64", with_url("data:image/png;base64,!!!not-base64!!!"), 400),
      ("not an image", with_url(not_image), 400),
      ("temperature 7", dict(body, temperature=7), 400),
      ("negative max_tokens", dict(body, max_tokens=-5), 400),
      ("url to loopback", with_url("http://127.0.0.1:1/image.png"), 400),
      ("unknown mode", dict(body, mode="enormous"), 400),
      ("over-limit image", with_url(too_big), 413),
  ], body


def test_bad_requests_get_openai_errors_and_the_server_keeps_working(server, client, golden_tokenizer):
  bad, good_body = _bad_requests()
  # A cheap good request (text only, 2 tokens) after every bad one; a golden image request at the end.
  text_only = {"messages": [{"role": "user", "content": "Free OCR."}], "max_tokens": 2}
  headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
  with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
    for name, body, status in bad:
      content = body if isinstance(body, bytes) else json.dumps(body).encode()
      r = http.post("/v1/chat/completions", content=content)
      assert r.status_code == status, (name, r.text)
      err = r.json()["error"]
      assert err["message"] and "Traceback" not in err["message"] and err["type"], name
      good = http.post("/v1/chat/completions", json=text_only)
      assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 2, (name, good.text)
    good = http.post("/v1/chat/completions", content=json.dumps(good_body).encode())
  assert good.status_code == 200, good.text
  assert good.json()["choices"][0]["message"]["content"] == _expected_text(_case(CASES[0]), golden_tokenizer)


def test_auth_is_enforced(server):
  no_key = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
  with pytest.raises(openai.AuthenticationError):
    no_key.models.list()
  r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
  assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
  assert httpx.get(server.url + "/health").status_code == 200  # probes need no key


def test_models_and_metrics(server, client):
  models = client.models.list()
  assert [m.id for m in models.data] == ["golden"]
  text = httpx.get(server.url + "/metrics").text
  for name in ("dsocr_requests_total", "dsocr_prompt_tokens_total", "dsocr_completion_tokens_total",
               "dsocr_image_tokens_total", "dsocr_time_to_first_token_seconds_bucket",
               "dsocr_request_latency_seconds_bucket", "dsocr_queue_depth", "dsocr_active_slots",
               "dsocr_repetition_stops_total"):
    assert name in text, name
  assert server.metric("dsocr_completion_tokens_total") > 0


def test_client_disconnect_frees_the_slot(server):
  case = _case(CASES[0])
  req = _request(case)
  body = dict(req["extra_body"], **{k: v for k, v in req.items() if k != "extra_body"})
  body.update(stream=True, max_tokens=600, ignore_eos=True)
  headers = {"Authorization": f"Bearer {API_KEY}"}
  busy = []
  with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
      assert r.status_code == 200
      for i, _ in enumerate(r.iter_lines()):
        if i == 10:
          busy.append(server.metric("dsocr_active_slots"))
          break
  assert busy == [1.0]
  deadline = time.monotonic() + 20
  while server.metric("dsocr_active_slots") != 0:
    assert time.monotonic() < deadline, "the abandoned request still holds its slot"
    time.sleep(0.2)
  assert server.metric("dsocr_cancelled_total") >= 1
