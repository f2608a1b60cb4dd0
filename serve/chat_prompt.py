"""OpenAI chat messages -> one PLAIN prompt text with `<image>` markers, and the images in marker order (spec 5.1).

Mapping:
  * a message's content parts become text in order: an `image_url` part becomes `<image>`, parts are joined with
    "\\n" (so [image, "Free OCR."] is the official `<image>\\nFree OCR.`);
  * if a message's text parts already carry exactly as many `<image>` markers as the message has image parts,
    that text is the template (the markers stay where the client put them, image parts add none);
  * a system (or developer) message that contains `<image>` is the template for the whole conversation: the
    images of the other messages fill its markers in order and their texts follow it;
  * all messages (system, user, assistant) are then concatenated in the hub's PLAIN format: each content
    stripped, no separators, no role tags, the result stripped. BOS is prepended by `build_prompt`.
Every inconsistency is a `ValueError` whose message starts with the offending field path.
"""

from __future__ import annotations

import dataclasses

from dsocr_jax.text.prompt import plain_format
from serve.protocol import ChatCompletionRequest, ChatMessage, ImagePart

IMAGE_MARKER = "<image>"


@dataclasses.dataclass(frozen=True)
class ImageRef:
  url: str
  detail: str | None
  param: str  # field path for error messages, e.g. messages[0].content[1].image_url.url


@dataclasses.dataclass(frozen=True)
class ChatPrompt:
  text: str  # PLAIN prompt with one `<image>` marker per entry of `images`
  images: list[ImageRef]


def _message_text(msg: ChatMessage, i: int, add_markers: bool) -> tuple[str, list[ImageRef]]:
  """The message's text (markers added for image parts when `add_markers`) and its images in order."""
  if msg.content is None:
    return "", []
  if isinstance(msg.content, str):
    return msg.content, []
  pieces, images = [], []
  for j, part in enumerate(msg.content):
    if isinstance(part, ImagePart):
      images.append(ImageRef(part.image_url.url, part.image_url.detail, f"messages[{i}].content[{j}].image_url.url"))
      if add_markers:
        pieces.append(IMAGE_MARKER)
    else:
      pieces.append(part.text)
  return "\n".join(pieces), images


def _message(msg: ChatMessage, i: int) -> tuple[str, list[ImageRef]]:
  text, images = _message_text(msg, i, add_markers=False)
  written = text.count(IMAGE_MARKER)
  if written == 0 and images:
    return _message_text(msg, i, add_markers=True)
  if written != len(images):
    raise ValueError(f"messages[{i}].content: the text has {written} {IMAGE_MARKER} marker(s) but the message "
                     f"has {len(images)} image part(s)")
  return text, images


def _is_system(msg: ChatMessage) -> bool:
  return msg.role in ("system", "developer")


def build_chat_prompt(req: ChatCompletionRequest) -> ChatPrompt:
  messages = req.messages
  templates = [i for i, m in enumerate(messages) if _is_system(m) and IMAGE_MARKER in _message_text(m, i, False)[0]]
  if len(templates) > 1:
    raise ValueError(f"messages[{templates[1]}]: only one system message may be an {IMAGE_MARKER} template")
  if templates:
    t = templates[0]
    template, template_images = _message_text(messages[t], t, add_markers=False)
    if template_images:
      raise ValueError(f"messages[{t}].content: a system template must not carry images itself")
    texts, images = [template], []
    for i, msg in enumerate(messages):
      if i == t:
        continue
      text, imgs = _message_text(msg, i, add_markers=False)
      if IMAGE_MARKER in text:
        raise ValueError(f"messages[{i}].content: {IMAGE_MARKER} markers belong in the system template")
      texts.append(text)
      images.extend(imgs)
    if template.count(IMAGE_MARKER) != len(images):
      raise ValueError(f"messages[{t}].content: the system template has {template.count(IMAGE_MARKER)} "
                       f"{IMAGE_MARKER} marker(s) but the conversation has {len(images)} image(s)")
    return ChatPrompt(plain_format(texts), images)
  texts, images = [], []
  for i, msg in enumerate(messages):
    text, imgs = _message(msg, i)
    texts.append(text)
    images.extend(imgs)
  prompt = plain_format(texts)
  if not prompt:
    raise ValueError("messages: the conversation has no text and no image")
  return ChatPrompt(prompt, images)
