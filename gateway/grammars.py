"""Structured outputs at the gateway: the grammar (llguidance's) a request's output must stay
inside, from its `response_format`, vLLM's `structured_outputs`, or a forced tool call. Built
and validated here, so that a spec the services could not compile is a 400 before any work;
the services compile each distinct one once (baton/structured.py) and mask with it.

llguidance, not xgrammar: it validates a grammar without a tokenizer or torch (this process
loads neither model nor torch for it), and its Lark grammars embed JSON schemas (%json), which
forced tool calls use (tools.py).
"""

import json

from llguidance import LLMatcher
from llguidance.gbnf_to_lark import any_to_lark

from baton.gateway.openai_types import (
    BadRequest,
    ChatRequest,
    CompletionRequest,
    ResponseFormat,
    StructuredOutputs,
)
from baton.gateway.tools import Format, forced_tools

# JSON outputs are written as json.dumps writes them: a small model free to put whitespace
# between tokens may write nothing else until max_tokens
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def output_grammar(req: CompletionRequest | ChatRequest, calls: Format | None) -> str | None:
    """The grammar (llguidance's) that keeps the output inside the request's
    `response_format`, `structured_outputs` or forced tool call (written as `calls`),
    checked here: a spec the services could not
    compile is a 400 before any work."""
    fmt, so = req.response_format, req.structured_outputs
    forced = forced_tools(req) if isinstance(req, ChatRequest) else None
    if forced is not None and calls is not None:
        if so is not None or (fmt is not None and fmt.type != "text"):
            raise BadRequest(
                "a forced tool call (tool_choice) cannot also follow a response format",
                "tool_choice",
            )
        try:
            # a named function: that one call; "required": as many as parallel_tool_calls allows
            parallel = req.parallel_tool_calls and req.tool_choice == "required"
            grammar = calls.grammar(forced, parallel)
        except Exception as e:
            raise BadRequest(f"tools: {e}", "tools") from e
        if error := LLMatcher.validate_grammar(grammar):
            raise BadRequest(f"tools: a function's parameters: {error}", "tools")
        return grammar
    if fmt is not None and fmt.type != "text" and so is not None:
        raise BadRequest(
            "give response_format or structured_outputs, not both", "structured_outputs"
        )
    param = "structured_outputs" if so is not None else "response_format"
    try:
        grammar = _grammar(fmt, so)
    except Exception as e:  # llguidance's converters raise plain exceptions for a bad spec
        raise BadRequest(f"{param}: {e}", param) from e
    if grammar is not None and (error := LLMatcher.validate_grammar(grammar)):
        raise BadRequest(f"{param}: {error}", param)
    return grammar


def _grammar(fmt: ResponseFormat | None, so: StructuredOutputs | None) -> str | None:
    if so is not None:
        given = {k: v for k, v in so.model_dump(by_alias=True).items() if v not in (None, False)}
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object")
        if so.json_ is not None:
            return LLMatcher.grammar_from_json_schema(so.json_, JSON_STYLE)
        if so.regex is not None:
            return LLMatcher.grammar_from_regex(so.regex)
        if so.choice is not None:  # Lark string literals take JSON's escapes
            alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in so.choice)
            return LLMatcher.grammar_from_lark(f"start: {alternatives}")
        if so.grammar is not None:
            return LLMatcher.grammar_from_lark(any_to_lark(so.grammar))
        return LLMatcher.grammar_from_json_schema({"type": "object"}, JSON_STYLE)
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, JSON_STYLE)
    if fmt.json_schema is None:
        raise ValueError("json_schema wants its `json_schema`")
    return LLMatcher.grammar_from_json_schema(fmt.json_schema.schema_, JSON_STYLE)
