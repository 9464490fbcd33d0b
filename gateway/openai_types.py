"""OpenAI request and response shapes (pydantic): FastAPI validates the requests with them,
the serving code builds every OpenAI response from them, and /openapi.json documents both."""

import time
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt

# ints cross the service sockets as msgpack int64: a bigger one is a 400 here, not a 500 there;
# strict, so `true` or `1.0` is no count (pydantic would read them as 1)
Int64 = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]


MAX_LOGIT_BIAS = 300  # entries in one request's logit_bias, OpenAI's cap
# the gateway matches stop strings on every token and the services scan stop ids every step:
# bounded, so one request cannot slow every stream (OpenAI allows 4 strings)
MAX_STOPS, MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS = 16, 256, 256


class _Strict(BaseModel):
    """A request shape: a field it does not declare is a 400 naming it, never dropped (the
    README lists what is implemented, what is accepted as harmless, and what is refused)."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchema(_Strict):
    name: str
    description: str | None = None
    schema_: dict = Field(alias="schema")
    strict: bool | None = None  # the output always follows the schema (Baton is always strict)


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class StructuredOutputs(_Strict):
    """vLLM's extension: the output follows exactly one of these."""

    json_: dict | str | None = Field(default=None, alias="json")  # a JSON schema
    regex: str | None = None
    choice: list[str] | None = Field(default=None, min_length=1)
    grammar: str | None = None  # EBNF (GBNF) or Lark
    json_object: bool | None = None


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1)  # None: the rest of the context
    temperature: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: Int64 | None = None
    min_p: float = Field(default=0.0, ge=0, le=1)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float = Field(default=1.0, gt=0, le=2)  # vLLM's extension
    # token id (a string, as JSON keys are) -> added to its logit
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        default=None, max_length=MAX_LOGIT_BIAS
    )
    seed: Int64 | None = None
    stop: str | list[str] | None = None  # at most MAX_STOPS of MAX_STOP_CHARS (params.py)
    stop_token_ids: list[Int64] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    n: StrictInt = Field(default=1, ge=1)  # at most [gateway] max_n
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: StrictInt = Field(default=0, ge=0)
    return_token_ids: bool = False  # vLLM's extension: each choice carries its token ids
    priority: Int64 = 0  # vLLM's extension: lower is scheduled sooner
    # vLLM's extension: only requests with the same salt (and API key) share cached prefixes
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)
    # accepted and harmless: none of these changes what is generated
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: Literal[False] = False  # Baton keeps no completions
    service_tier: str | None = None
    prompt_cache_key: str | None = None  # prefixes are cached whatever the key
    safety_identifier: str | None = None
    response_format: ResponseFormat | None = None  # json: the output follows it (grammar)
    structured_outputs: StructuredOutputs | None = None


class CompletionRequest(_Sampling):
    # strict: a bool or a float is no token id
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class ContentPart(BaseModel):
    """A part of a message's content: text parts are joined; any other type is a 400."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ToolCallFunction(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls, rendered by the template
    tool_call_id: str | None = None  # a tool's result: which call it answers


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None  # a JSON schema; the arguments of a forced call follow it
    strict: bool | None = None  # forced calls always follow it


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True


# --- responses (vLLM's entrypoints/openai/protocol.py, trimmed to what Baton answers) --------

FinishReason = Literal["stop", "length", "tool_calls"]


def now() -> int:
    return int(time.time())


T = TypeVar("T")
# a field left out of the JSON when None: the official shapes omit these, not null them
Omitted = Annotated[T | None, Field(exclude_if=lambda v: v is None)]


class TokenDetails(BaseModel):
    reasoning_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: Omitted[TokenDetails] = None  # with a reasoning parser


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]]


class CompletionChoice(BaseModel):
    """One choice of a completion, or of one of its stream chunks (the same shape)."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None
    token_ids: Omitted[list[int]] = None  # vLLM's extension, with `return_token_ids`


class _Head(BaseModel):
    """What every response and stream chunk starts with."""

    id: str
    object: str
    created: int
    model: str


class CompletionResponse(_Head):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage


class CompletionStreamResponse(_Head):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Omitted[Usage] = None  # only on the last chunk, with `include_usage`


class TopLogprob(BaseModel):
    token: str
    logprob: float


class ChatLogprob(BaseModel):
    token: str
    logprob: float | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: Omitted[str] = None  # with a reasoning parser: the model's thinking
    tool_calls: Omitted[list[ToolCall]] = None


class ToolCallDelta(BaseModel):
    """A whole call in one stream chunk: OpenAI's clients join a call's deltas by `index`."""

    index: int
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class DeltaMessage(BaseModel):
    role: Omitted[Literal["assistant"]] = None  # only on a choice's first chunk
    content: Omitted[str] = None
    reasoning_content: Omitted[str] = None
    tool_calls: Omitted[list[ToolCallDelta]] = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None
    token_ids: Omitted[list[int]] = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None
    token_ids: Omitted[list[int]] = None


class ChatCompletionResponse(_Head):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatCompletionStreamResponse(_Head):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatStreamChoice]
    usage: Omitted[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "baton"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_response(message: str, type_: str, code: int, param: str | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=code))


class BadRequest(ValueError):
    """A request the server will not serve as asked: a 400 naming `param`."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ModelNotFound(LookupError):
    pass
