"""A request's fields checked against this model and turned into what the services run:
SamplingParams (penalties, bias, grammar, ...), the chat messages a template takes, and the
tools it can show. A field that cannot be served as asked is a BadRequest naming it."""

from msgspec.structs import replace

from baton.gateway.grammars import output_grammar
from baton.gateway.openai_types import (
    MAX_STOP_CHARS,
    MAX_STOPS,
    BadRequest,
    ChatRequest,
    CompletionRequest,
    NamedToolChoice,
)
from baton.gateway.sessions import CacheScope
from baton.gateway.tools import Format
from baton.sampling_params import SamplingParams


def sampling_params(
    req: CompletionRequest | ChatRequest,
    max_tokens: int | None,
    logprobs: int | None,
    max_model_len: int,
    vocab_size: int,
    calls: Format | None,
    cache: CacheScope,
) -> SamplingParams:
    """What the services run a request with; max_tokens absent: the model's context (run
    sets it per prompt); `calls`: how a forced tool call is written; `cache`: whose cached
    prefixes it shares, and how long its KV stays cached after it (gateway.sessions)."""
    stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
    if len(stop) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stop):
        raise BadRequest(
            f"stop: at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters", "stop"
        )
    if max_tokens is not None and max_tokens > max_model_len:
        raise BadRequest(
            f"max_tokens is {max_tokens}; this model's context is {max_model_len}",
            "max_tokens",
        )
    bias = logit_bias(req.logit_bias or {}, vocab_size)
    grammar = output_grammar(req, calls)
    try:
        return SamplingParams(
            # absent: the rest of the context, set per prompt (run)
            max_tokens=max_tokens or max_model_len,
            min_tokens=req.min_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k if req.top_k and req.top_k > 0 else None,
            min_p=req.min_p,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            logit_bias=bias,
            grammar=grammar,
            seed=req.seed,
            stop=tuple(stop),
            stop_token_ids=tuple(req.stop_token_ids or ()),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            session_ttl_s=cache.ttl_s,
            cache_salt=cache.salt,
            priority=req.priority,
        )
    except ValueError as e:  # each message starts with the field's name
        raise BadRequest(str(e), str(e).split()[0]) from e


def check_tools(req: ChatRequest, template: str, calls: Format | None) -> None:
    """Tools reach the model only through a template that renders them, and calls come
    back only through a parser: a request that needs either where it is missing is a
    400, never a silent answer without them."""
    choice = req.tool_choice
    if not req.tools and choice not in (None, "none"):
        raise BadRequest("tool_choice wants `tools`", "tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in {
        t.function.name for t in req.tools or ()
    }:
        raise BadRequest(f"tool_choice: no tool is named {choice.function.name!r}", "tool_choice")
    hint = "start the gateway with --chat-template hermes --tool-call-parser hermes"
    if req.tools and "tools" not in template:
        raise BadRequest(f"tools: this chat template does not show tools; {hint}", "tools")
    if req.tools and choice != "none" and calls is None:
        raise BadRequest(f"tools: no tool call parser to read the calls; {hint}", "tools")
    if "tool_calls" not in template:
        for i, m in enumerate(req.messages):
            if m.tool_calls:
                raise BadRequest(
                    f"this chat template does not show an assistant's tool calls; {hint}",
                    f"messages.{i}.tool_calls",
                )


def logit_bias(bias: dict[str, float], vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} as (id, bias) pairs, every id in the vocabulary."""
    try:
        pairs = tuple((int(k), float(v)) for k, v in bias.items())
    except ValueError as e:
        raise BadRequest(f"logit_bias keys must be token ids: {e}", "logit_bias") from e
    if any(not 0 <= t < vocab_size for t, _ in pairs):
        raise BadRequest(f"logit_bias token ids must be in [0, {vocab_size})", "logit_bias")
    return pairs


def flatten(index: int, message: dict) -> dict:
    """A chat message whose content is a list of parts (what the OpenAI SDK and agent
    frameworks send) with its text parts joined, as vLLM joins them, for the chat template."""
    parts = message.get("content")
    if not isinstance(parts, list):
        return message
    for part in parts:
        if part["type"] != "text" or part.get("text") is None:
            raise BadRequest(
                f"a {part['type']!r} content part: this model takes text only",
                f"messages.{index}.content",
            )
    return {**message, "content": "\n".join(part["text"] for part in parts)}


def nth(params: SamplingParams, j: int) -> SamplingParams:
    """The sampling of a prompt's j-th choice: a seeded request's choices draw from seeds
    seed, seed + 1, ... (as vLLM's), so each is reproducible and they differ."""
    if params.seed is None or j == 0:
        return params
    return replace(params, seed=(params.seed + j) % 2**63)


def check_priority(req: CompletionRequest | ChatRequest, allowed: bool) -> None:
    """Any client could jump every queue and preempt everyone else's requests: a non-zero
    priority is served only where the operator allows it."""
    if req.priority and not allowed:
        raise BadRequest(
            "priority is not enabled on this server ([gateway] allow_priority)", "priority"
        )
