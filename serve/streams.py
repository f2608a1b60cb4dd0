"""What the HTTP layer consumes from the model side: a prepared prompt and one event stream per choice.

`serve.app` depends only on these types and on the `Backend` protocol, so the routes can be exercised with a fake
backend in fast tests while `serve.service.OCRService` implements them on the real engine.
"""

from __future__ import annotations

import dataclasses
from typing import AsyncIterator, Optional, Protocol, Union

from serve.protocol import ChatCompletionRequest, TokenLogprob


@dataclasses.dataclass
class PreparedPrompt:
  input_ids: list[int]  # BOS + text + image placeholders
  images_seq_mask: object  # np.ndarray bool [T]
  image_features: object  # np.ndarray / jax.Array [N, D], or None without images
  image_sizes: list[tuple[int, int]]  # (W, H) of each original image, prompt order
  num_image_tokens: int
  prepare_seconds: float  # image fetch + decode + preprocess + vision encode

  @property
  def prompt_tokens(self) -> int:
    return len(self.input_ids)


@dataclasses.dataclass
class TextDelta:
  text: str
  num_tokens: int  # generated tokens this delta accounts for (a delta may carry 0 when text is held back)
  logprobs: Optional[list[TokenLogprob]] = None


@dataclasses.dataclass
class Finished:
  finish_reason: str  # "stop" | "length" (OpenAI vocabulary)
  stop_reason: Optional[Union[str, int]]  # "repetition", the matched stop string, a stop token id, or None
  completion_tokens: int
  engine_seconds: float  # submit -> finish, including waiting for a slot
  first_token_at: Optional[float]  # time.monotonic() of the first generated token, None if there was none
  tail: str = ""  # text held back until the end (an incomplete character)


ChoiceEvent = Union[TextDelta, Finished]


class ChoiceStream(Protocol):

  def __aiter__(self) -> AsyncIterator[ChoiceEvent]:
    ...

  def cancel(self) -> None:
    ...


class Backend(Protocol):
  model_name: str
  model_root: str  # checkpoint path or a description of the embedded model
  max_slots: int

  def is_ready(self) -> bool:
    ...

  async def prepare(self, req: ChatCompletionRequest) -> PreparedPrompt:
    """Raises serve.protocol.APIError (4xx) for bad images or prompts."""
    ...

  def generate(self, prepared: PreparedPrompt, req: ChatCompletionRequest, index: int) -> ChoiceStream:
    ...

  def active_slots(self) -> int:
    ...

  def queue_depth(self) -> int:
    ...
