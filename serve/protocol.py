"""OpenAI chat-completions wire types (pydantic), our extensions, and the error type the routes raise.

The request mirrors OpenAI's `POST /v1/chat/completions`. DeepSeek-OCR extensions sit at the top level (what
the openai client sends for `extra_body={...}`): `mode`, `max_crops`, `ngram_size`, `ngram_window`,
`repetition_stop`, `ignore_eos`, `skip_special_tokens`, `grounding`, `top_k`. Unknown fields are refused (400 naming the
field), as OpenAI does, so that a misspelt extension is not silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dsocr_jax.config import MODES

ModeName = Literal[tuple(MODES)]  # tiny, small, base, large, gundam, gundam-m


class APIError(Exception):
  """An error the client caused (4xx) or a state the server is in (429/503), rendered as OpenAI error JSON."""

  def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None, headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
    self.headers = headers or {}

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------------------- request


class _Strict(BaseModel):
  model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
  url: str
  detail: Optional[Literal["auto", "low", "high"]] = None


class TextPart(_Strict):
  type: Literal["text"]
  text: str


class ImagePart(_Strict):
  type: Literal["image_url"]
  image_url: ImageURL

  @field_validator("image_url", mode="before")
  @classmethod
  def _bare_string(cls, v):
    # Some clients send `"image_url": "data:..."`; accept it as {"url": ...}.
    return {"url": v} if isinstance(v, str) else v


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(_Strict):
  role: Literal["system", "developer", "user", "assistant"]
  content: Union[str, list[ContentPart], None] = None
  name: Optional[str] = None


class StreamOptions(_Strict):
  include_usage: bool = False


class ResponseFormat(BaseModel):
  model_config = ConfigDict(extra="allow")  # json_schema etc. ride along; only `type` decides
  type: str


class ChatCompletionRequest(_Strict):
  model: Optional[str] = None
  messages: list[ChatMessage] = Field(min_length=1)
  max_tokens: Optional[int] = Field(None, ge=1)
  max_completion_tokens: Optional[int] = Field(None, ge=1)
  temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
  top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
  stop: Union[str, list[str], None] = None
  stream: bool = False
  stream_options: Optional[StreamOptions] = None
  frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
  presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
  seed: Optional[int] = None
  n: int = Field(1, ge=1, le=8)
  logprobs: bool = False
  top_logprobs: Optional[int] = Field(None, ge=0, le=20)
  response_format: Optional[ResponseFormat] = None
  user: Optional[str] = None
  # Accepted and ignored: bookkeeping fields some clients always send.
  store: Optional[bool] = None
  metadata: Optional[dict[str, str]] = None
  # Refused when set (validated below): tool calling and logit bias have no meaning for an OCR model.
  tools: Optional[list[Any]] = None
  tool_choice: Optional[Any] = None
  logit_bias: Optional[dict[str, float]] = None

  # ----- DeepSeek-OCR extensions (openai client: extra_body)
  mode: Optional[ModeName] = None
  max_crops: Optional[int] = Field(None, ge=2, le=9)  # tiling candidates need i*j >= min_crops = 2 (spec 4.3)
  top_k: Optional[int] = Field(None, ge=0)
  ngram_size: Optional[int] = Field(None, ge=0)  # 0 turns the no-repeat n-gram guard off
  ngram_window: Optional[int] = Field(None, ge=1)
  repetition_stop: Optional[bool] = None
  ignore_eos: bool = False  # as vLLM: generate through EOS (benchmarks, fixed-length outputs)
  skip_special_tokens: bool = False
  grounding: bool = False

  @field_validator("stop")
  @classmethod
  def _stop_list(cls, v):
    if isinstance(v, list):
      if len(v) > 4:
        raise ValueError("at most 4 stop sequences are allowed")
      if any(not s for s in v):
        raise ValueError("stop sequences must be non-empty")
    elif v == "":
      raise ValueError("stop sequences must be non-empty")
    return v

  @model_validator(mode="after")
  def _unsupported(self):
    if self.response_format is not None and self.response_format.type != "text":
      raise ValueError(f"response_format: type {self.response_format.type!r} is not supported; only 'text' is")
    if self.tools:
      raise ValueError("tools: tool calling is not supported by this OCR model")
    if self.tool_choice not in (None, "none"):
      raise ValueError("tool_choice: tool calling is not supported by this OCR model")
    if self.logit_bias:
      raise ValueError("logit_bias: not supported")
    if self.top_logprobs and not self.logprobs:
      raise ValueError("top_logprobs: requires logprobs=true")
    if self.stream_options is not None and not self.stream:
      raise ValueError("stream_options: only allowed when stream=true")
    return self

  @property
  def stop_list(self) -> list[str]:
    return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

  @property
  def completion_limit(self) -> Optional[int]:
    return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ------------------------------------------------------------------------------------------------ response


def completion_id() -> str:
  return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
  return int(time.time())


class TopLogprob(BaseModel):
  token: str
  logprob: float
  bytes: Optional[list[int]] = None


class TokenLogprob(TopLogprob):
  top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
  content: Optional[list[TokenLogprob]] = None


class GroundingSpan(BaseModel):
  label: str
  boxes: Optional[list[list[int]]]  # pixels of the original image; None when the request had no image
  boxes_normalized: list[list[int]]  # the model's 0-999 grid


class ResponseMessage(BaseModel):
  role: Literal["assistant"] = "assistant"
  content: Optional[str] = None
  grounding: Optional[list[GroundingSpan]] = None


class Choice(BaseModel):
  index: int
  message: ResponseMessage
  finish_reason: Optional[str]
  logprobs: Optional[ChoiceLogprobs] = None
  stop_reason: Optional[Union[str, int]] = None  # extension: "repetition", the stop string, or a stop token id


class Usage(BaseModel):
  prompt_tokens: int
  completion_tokens: int
  total_tokens: int
  prompt_tokens_details: Optional[dict[str, int]] = None  # {"image_tokens": N}


class ChatCompletion(BaseModel):
  id: str
  object: Literal["chat.completion"] = "chat.completion"
  created: int
  model: str
  choices: list[Choice]
  usage: Usage
  system_fingerprint: Optional[str] = None


class DeltaMessage(BaseModel):
  role: Optional[Literal["assistant"]] = None
  content: Optional[str] = None
  grounding: Optional[list[GroundingSpan]] = None


class ChunkChoice(BaseModel):
  index: int
  delta: DeltaMessage
  finish_reason: Optional[str] = None
  logprobs: Optional[ChoiceLogprobs] = None
  stop_reason: Optional[Union[str, int]] = None


class ChatCompletionChunk(BaseModel):
  id: str
  object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
  created: int
  model: str
  choices: list[ChunkChoice]
  usage: Optional[Usage] = None


class ModelCard(BaseModel):
  id: str
  object: Literal["model"] = "model"
  created: int
  owned_by: str = "dsocr-jax"
  root: Optional[str] = None  # the checkpoint it was loaded from, or a description of the embedded model


class ModelList(BaseModel):
  object: Literal["list"] = "list"
  data: list[ModelCard]
