"""Tool calling: the chat template that shows the model its tools, the grammar that makes it
call them (`tool_choice` "required" or a named function), and the parser that reads the calls
back out of its text (Hermes style: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`).

The grammar is llguidance's, like a `response_format`'s, so it holds on the prefill (the first
token) and the decode alike; "auto" leaves the model free and parses what it writes.
"""

import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from llguidance import LLMatcher

from baton.gateway.openai_types import (
    ChatRequest,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolCallFunction,
)

TEMPLATES = Path(__file__).parent / "templates"
PARSERS = ("hermes",)
OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_PARALLEL_CALLS = 8  # one answer's calls, where parallel_tool_calls lets it make several
# JSON as json.dumps writes it (serving.JSON_STYLE), inside the grammar's %json blocks too
X_GUIDANCE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.S)


def load_template(name: str | None) -> str | None:
    """`[gateway] chat_template`: one of ours by name (templates/NAME.jinja), a file, or None
    for the model's own."""
    if name is None:
        return None
    ours = TEMPLATES / f"{name}.jinja"
    return (ours if ours.exists() else Path(name)).read_text()


def call_grammar(tools: list[Tool], parallel: bool) -> str:
    """A Lark grammar whose sentences are Hermes tool calls of `tools`, each one's arguments
    following its function's JSON schema: one call, or with `parallel` up to
    MAX_PARALLEL_CALLS."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t.function.name},
                "arguments": t.function.parameters or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = json.dumps({"anyOf": calls, "x-guidance": X_GUIDANCE})
    more = f' ("\\n" call)~0..{MAX_PARALLEL_CALLS - 1}' if parallel else ""
    return LLMatcher.grammar_from_lark(
        f'start: call{more}\ncall: "{OPEN}\\n" %json {schema} "\\n{CLOSE}"\n'
    )


def forced_tools(req: ChatRequest) -> list[Tool] | None:
    """The tools a call must be made to ("required": any of them; a named one: it), or None
    where the model may answer in text."""
    choice = req.tool_choice
    if not req.tools or choice in (None, "none", "auto"):
        return None
    if choice == "required":
        return req.tools
    return [t for t in req.tools if t.function.name == choice.function.name]


def parse(text: str) -> tuple[str | None, list[ToolCall]]:
    """Hermes tool calls out of an answer: (the text before them, or None if blank; the
    calls). A block that is not a JSON call with a name stays in the text, as vLLM does."""
    calls: list[ToolCall] = []
    for m in CALL.finditer(text):
        try:
            call = json.loads(m.group(1))
            name, arguments = call["name"], call.get("arguments", {})
        except (ValueError, TypeError, KeyError):
            return text, []
        if not isinstance(name, str):
            return text, []
        calls.append(
            ToolCall(
                id=f"call_{uuid.uuid4().hex[:24]}",
                function=ToolCallFunction(name=name, arguments=json.dumps(arguments)),
            )
        )
    if not calls:
        return text, []
    head = text[: text.index(OPEN)].strip()
    return head or None, calls


@dataclass
class ToolStream:
    """One streamed choice's text split into content to send now and tool calls held to the
    end: text that is or may become `<tool_call>` is held back."""

    held: str = ""
    calling: bool = False  # a call has begun: everything from here is held

    def feed(self, text: str) -> str:
        """The part of `text` that can go out as content now."""
        self.held += text
        if self.calling:
            return ""
        if OPEN in self.held:
            self.calling = True
            out, self.held = self.held.split(OPEN, 1)
            self.held = OPEN + self.held
            return out
        keep = next(
            (k for k in range(min(len(OPEN) - 1, len(self.held)), 0, -1)
             if OPEN.startswith(self.held[-k:])),
            0,
        )  # fmt: skip
        out = self.held[: len(self.held) - keep]
        self.held = self.held[len(out) :]
        return out

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """At the end: the content still held, and the calls as OpenAI's stream deltas."""
        content, calls = parse(self.held)
        if not calls:
            return self.held, []
        deltas = [ToolCallDelta(index=i, id=c.id, function=c.function) for i, c in enumerate(calls)]
        return content or "", deltas
