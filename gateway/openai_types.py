"""OpenAI request and response shapes (pydantic, as FastAPI wants)."""

import time
from typing import Annotated, Literal

from pydantic import BaseModel, Field, StrictInt

# ints cross the service sockets as msgpack int64: a bigger one is a 400 here, not a 500 there;
# strict, so `true` or `1.0` is no count (pydantic would read them as 1)
Int64 = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model: str | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: Int64 | None = None
    min_p: float = Field(default=0.0, ge=0, le=1)
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Int64] | None = None
    n: StrictInt = Field(default=1, ge=1, le=1)  # n > 1 is not supported yet
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: StrictInt = Field(default=0, ge=0)
    user: str | None = None
    return_token_ids: bool = False  # vLLM's extension: each choice carries its token ids
    priority: Int64 = 0  # vLLM's extension: lower is scheduled sooner


class CompletionRequest(_Sampling):
    # strict: a bool or a float is no token id
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def now() -> int:
    return int(time.time())


def error_body(message: str, type_: str, code: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
