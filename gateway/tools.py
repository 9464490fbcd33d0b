"""Tool calling: the chat template that shows the model its tools, the grammar that makes it
call them (`tool_choice` "required" or a named function), and the parser that reads the calls
back out of its text. Three formats, each a template in templates/ and a parser of the same
name (`--chat-template NAME --tool-call-parser NAME`):
- hermes: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one per call;
- mistral: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`;
- llama3_json: the answer is `{"name": ..., "parameters": {...}}`, calls joined by `; `.

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
from baton.text import held_back

TEMPLATES = Path(__file__).parent / "templates"
MAX_PARALLEL_CALLS = 8  # one answer's calls, where parallel_tool_calls lets it make several
# JSON as json.dumps writes it (grammars.JSON_STYLE), inside the grammar's %json blocks too
X_GUIDANCE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def load_template(name: str | None) -> str | None:
    """`[gateway] chat_template`: one of ours by name (templates/NAME.jinja), a file, or None
    for the model's own."""
    if name is None:
        return None
    ours = TEMPLATES / f"{name}.jinja"
    return (ours if ours.exists() else Path(name)).read_text()


@dataclass(frozen=True)
class Format:
    """How one model family writes its calls. `marker` begins the calls; `anywhere`: they may
    follow some text (else they are the whole answer); `args`: the arguments' key."""

    marker: str
    anywhere: bool
    args: str = "arguments"

    def call_schema(self, tool: Tool) -> dict:
        return {
            "type": "object",
            "properties": {
                "name": {"const": tool.function.name},
                self.args: tool.function.parameters or {"type": "object"},
            },
            "required": ["name", self.args],
            "additionalProperties": False,
        }

    def grammar(self, tools: list[Tool], parallel: bool) -> str:
        """A Lark grammar of answers that are calls of `tools` alone, each one's arguments
        following its function's schema: one call, or with `parallel` up to
        MAX_PARALLEL_CALLS."""
        call = {"anyOf": [self.call_schema(t) for t in tools]}
        most = MAX_PARALLEL_CALLS if parallel else 1
        return LLMatcher.grammar_from_lark(self.lark(call, most))

    def lark(self, call: dict, most: int) -> str:
        """The grammar's Lark text; each %json block's top level carries X_GUIDANCE (llguidance
        reads it there only)."""
        raise NotImplementedError

    def split(self, text: str) -> tuple[str, str] | None:
        """(the text before the calls, the calls) where the answer makes calls."""
        at = text.find(self.marker)
        if at < 0 or (not self.anywhere and text[:at].strip()):
            return None
        return text[:at], text[at:]

    def calls(self, body: str) -> list[dict]:
        """The {"name", args} objects in the calls' text; ValueError where it is not that."""
        raise NotImplementedError


class Hermes(Format):
    def lark(self, call: dict, most: int) -> str:
        more = f' ("\\n" call)~0..{most - 1}' if most > 1 else ""
        schema = json.dumps({**call, "x-guidance": X_GUIDANCE})
        return f'start: call{more}\ncall: "<tool_call>\\n" %json {schema} "\\n</tool_call>"\n'

    def calls(self, body: str) -> list[dict]:
        blocks = re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", body, re.S)
        if not blocks or re.sub(r"<tool_call>.*?</tool_call>", "", body, flags=re.S).strip():
            raise ValueError("not only tool calls")
        return [json.loads(b) for b in blocks]


class Mistral(Format):
    def lark(self, call: dict, most: int) -> str:
        array = {"type": "array", "items": call, "minItems": 1, "maxItems": most}
        return f'start: "[TOOL_CALLS] " %json {json.dumps({**array, "x-guidance": X_GUIDANCE})}\n'

    def calls(self, body: str) -> list[dict]:
        calls = json.loads(body[len(self.marker) :])
        if not isinstance(calls, list):
            raise ValueError("[TOOL_CALLS] wants a list")
        return calls


class Llama3Json(Format):
    def lark(self, call: dict, most: int) -> str:
        more = f' ("; " call)~0..{most - 1}' if most > 1 else ""
        return f"start: call{more}\ncall: %json {json.dumps({**call, 'x-guidance': X_GUIDANCE})}\n"

    def calls(self, body: str) -> list[dict]:
        decoder, calls, at = json.JSONDecoder(), [], 0
        while True:
            call, at = decoder.raw_decode(body, at)
            calls.append(call)
            rest = body[at:].lstrip()
            if not rest:
                return calls
            if not rest.startswith(";"):
                raise ValueError("calls are joined by ;")
            at = len(body) - len(rest[1:].lstrip())


FORMATS: dict[str, Format] = {
    "hermes": Hermes("<tool_call>", anywhere=True),
    "mistral": Mistral("[TOOL_CALLS]", anywhere=True),
    "llama3_json": Llama3Json("{", anywhere=False, args="parameters"),
}


def forced_tools(req: ChatRequest) -> list[Tool] | None:
    """The tools a call must be made to ("required": any of them; a named one: it), or None
    where the model may answer in text."""
    choice = req.tool_choice
    if not req.tools or choice in (None, "none", "auto"):
        return None
    if choice == "required":
        return req.tools
    return [t for t in req.tools if t.function.name == choice.function.name]


def parse(fmt: Format, text: str) -> tuple[str | None, list[ToolCall]]:
    """The calls in an answer: (the text before them, or None if blank; the calls). Calls
    that do not parse as {"name", args} objects stay in the text, as vLLM's parsers leave
    them."""
    parts = fmt.split(text)
    if parts is None:
        return text, []
    head, body = parts
    try:
        objects = fmt.calls(body)
        calls = [
            ToolCall(
                id=f"call_{uuid.uuid4().hex[:24]}",
                function=ToolCallFunction(
                    name=o["name"], arguments=json.dumps(o.get(fmt.args, {}))
                ),
            )
            for o in objects
            if isinstance(o["name"], str)
        ]
    except (ValueError, TypeError, KeyError):
        return text, []
    if len(calls) != len(objects):
        return text, []
    return head.strip() or None, calls


@dataclass
class ToolStream:
    """One streamed choice's text split into content to send now and calls held to the end:
    text that is or may become the format's marker is held back."""

    fmt: Format
    held: str = ""
    calling: bool = False  # the calls have begun: everything from here is held
    sent: bool = False  # some text went out (a format whose calls are the whole answer: none)

    def feed(self, text: str) -> str:
        """The part of `text` that can go out as content now."""
        self.held += text
        if self.calling:
            return ""
        if (parts := self.fmt.split(self.held)) is not None and (
            self.fmt.anywhere or not self.sent
        ):
            self.calling = True
            out, self.held = parts
            return out
        if not self.fmt.anywhere:  # the calls can only open the answer
            if self.sent or self.held.strip():
                self.sent = True
                out, self.held = self.held, ""
                return out
            return ""
        keep = held_back(self.held, (self.fmt.marker,))
        out = self.held[: len(self.held) - keep]
        self.held = self.held[len(out) :]
        return out

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """At the end: the content still held, and the calls as OpenAI's stream deltas."""
        content, calls = parse(self.fmt, self.held)
        if not calls:
            return self.held, []
        deltas = [ToolCallDelta(index=i, id=c.id, function=c.function) for i, c in enumerate(calls)]
        return content or "", deltas
