"""Unit tests of the server's pure parts: grounding parser, image URL loading and SSRF guard, chat -> prompt."""

import asyncio
import base64
import ipaddress

import pytest

from serve import grounding, images
from serve.chat_prompt import build_chat_prompt
from serve.protocol import ChatCompletionRequest


# ------------------------------------------------------------------------------------------------ grounding


def test_grounding_spec_example_pixels_use_999_divisor():
  text = ("<|ref|>title<|/ref|><|det|>[[0, 0, 999, 500]]<|/det|>\n# Heading\n"
          "<|ref|>text<|/ref|><|det|>[[100, 200, 300, 400], [10,20,30,40]]<|/det|>body")
  spans = grounding.parse_grounding(text, (1998, 999))
  assert [s.label for s in spans] == ["title", "text"]
  assert spans[0].boxes_normalized == [[0, 0, 999, 500]]
  # x_px = int(x / 999 * W): 999 -> W exactly, 500/999*999 = 500.
  assert spans[0].boxes == [[0, 0, 1998, 500]]
  assert spans[1].boxes == [[200, 200, 600, 400], [20, 20, 60, 40]]


def test_grounding_hand_worked_rounding_down():
  # 333/999*1000 = 333.33 -> 333; 998/999*700 = 699.299 -> 699 (int() truncates).
  (span,) = grounding.parse_grounding("<|ref|>a<|/ref|><|det|>[[333, 998, 998, 333]]<|/det|>", (1000, 700))
  assert span.boxes == [[333, 699, 998, 233]]


def test_grounding_malformed_spans_are_skipped_never_evaluated():
  text = ("<|ref|>x<|/ref|><|det|>__import__('os').system('true')<|/det|>"
          "<|ref|>y<|/ref|><|det|>[[1, 2, 3]]<|/det|>"
          "<|ref|>z<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>")
  spans = grounding.parse_grounding(text, None)
  assert [(s.label, s.boxes_normalized, s.boxes) for s in spans] == [("z", [[1, 2, 3, 4]], None)]


def test_grounding_clamps_out_of_grid_values():
  (span,) = grounding.parse_grounding("<|ref|>a<|/ref|><|det|>[[-5, 0, 1200, 999]]<|/det|>", (100, 100))
  assert span.boxes_normalized == [[0, 0, 999, 999]]
  assert span.boxes == [[0, 0, 100, 100]]


def test_box_list_grammar():
  assert grounding.parse_box_list(" [ [1,2,3,4] , [5, 6, 7, 8] ] ") == [[1, 2, 3, 4], [5, 6, 7, 8]]
  assert grounding.parse_box_list("[]") == []
  for bad in ("", "[[1,2,3,4]", "[[1,2,3,4,5]]", "[[1.5,2,3,4]]", "[[1,2,3,4]] x", "[(1,2,3,4)]"):
    assert grounding.parse_box_list(bad) is None, bad


# ------------------------------------------------------------------------------------------------- images


def test_data_uri_roundtrip_and_errors():
  payload = b"\x89PNG not really"
  uri = "data:image/png;base64," + base64.b64encode(payload).decode()
  assert images.decode_data_uri(uri) == payload
  for bad in ("data:image/png;base64,@@@@", "data:image/png,abc", "data:;base64", "data:image/png;base64,"):
    with pytest.raises(images.ImageFetchError):
      images.decode_data_uri(bad)
  with pytest.raises(images.ImageFetchError) as e:
    images.decode_data_uri("data:image/png;base64," + base64.b64encode(b"x" * 100).decode(), max_bytes=50)
  assert e.value.status == 413


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/a.png", "http://localhost:8000/a.png", "http://[::1]/a.png", "http://10.1.2.3/x",
    "http://192.168.0.1/x", "http://169.254.169.254/latest/meta-data", "http://[::ffff:127.0.0.1]/x",
    "http://0.0.0.0/x", "http://100.64.0.1/x", "http://224.0.0.1/x", "https://[fe80::1]/x",
    "file:///etc/passwd", "ftp://example.com/x", "http://user:pw@example.com/x", "http:///x",
])
def test_ssrf_guard_refuses_before_connecting(url):
  # Every one of these is refused by the address/scheme check: no connection is attempted (limits would
  # otherwise make this a network test).
  with pytest.raises(images.ImageFetchError):
    asyncio.run(images.load_image_bytes(url, images.FetchLimits(timeout_s=2.0)))


def test_public_address_classification():
  assert images.is_public_address(ipaddress.ip_address("8.8.8.8"))
  assert images.is_public_address(ipaddress.ip_address("2606:4700:4700::1111"))
  for a in ("127.0.0.2", "10.0.0.1", "172.16.5.4", "::1", "fc00::1", "2002:7f00:0001::1", "::ffff:10.0.0.1"):
    assert not images.is_public_address(ipaddress.ip_address(a)), a


# -------------------------------------------------------------------------------------------- chat -> prompt


def _req(messages):
  return ChatCompletionRequest(messages=messages)


def _img(url="data:x", detail=None):
  return {"type": "image_url", "image_url": {"url": url, **({"detail": detail} if detail else {})}}


def test_image_then_text_is_the_official_prompt():
  p = build_chat_prompt(_req([{"role": "user", "content": [_img(), {"type": "text", "text": "Free OCR."}]}]))
  assert p.text == "<image>\nFree OCR."
  assert [i.param for i in p.images] == ["messages[0].content[0].image_url.url"]


def test_images_in_order_and_text_only_prompt():
  p = build_chat_prompt(_req([{"role": "user", "content": [
      {"type": "text", "text": "a"}, _img("u1"), _img("u2", "low"), {"type": "text", "text": "b"}]}]))
  assert p.text == "a\n<image>\n<image>\nb"
  assert [(i.url, i.detail) for i in p.images] == [("u1", None), ("u2", "low")]
  assert build_chat_prompt(_req([{"role": "user", "content": " hello "}])).text == "hello"


def test_client_written_markers_are_kept():
  p = build_chat_prompt(_req([{"role": "user", "content": [
      {"type": "text", "text": "<image>\n<|grounding|>Convert the document to markdown."}, _img()]}]))
  assert p.text == "<image>\n<|grounding|>Convert the document to markdown."
  with pytest.raises(ValueError, match=r"messages\[0\]\.content"):
    build_chat_prompt(_req([{"role": "user", "content": "<image> <image>"}]))


def test_system_template_and_plain_multi_turn():
  p = build_chat_prompt(_req([
      {"role": "system", "content": "<image>\n<|grounding|>OCR this image."},
      {"role": "user", "content": [_img("u1")]}]))
  assert p.text == "<image>\n<|grounding|>OCR this image." and len(p.images) == 1
  # PLAIN: contents stripped and concatenated, no roles, no separators (spec 5.1).
  p = build_chat_prompt(_req([
      {"role": "system", "content": "Be brief. "},
      {"role": "user", "content": [_img(), {"type": "text", "text": "Free OCR."}]},
      {"role": "assistant", "content": " Hello "},
      {"role": "user", "content": "Again."}]))
  assert p.text == "Be brief.<image>\nFree OCR.HelloAgain."
  with pytest.raises(ValueError, match="template"):
    build_chat_prompt(_req([{"role": "system", "content": "<image> <image>"},
                            {"role": "user", "content": [_img()]}]))
