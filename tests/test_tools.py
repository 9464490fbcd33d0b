"""Tool calling through a 1P+1D stack started with `--chat-template F --tool-call-parser F`
for each format F (hermes, mistral, llama3_json), with the official client: forced calls (a
named function, "required") follow their functions' schemas; streamed deltas join to the same
calls; "auto" parses a call the model writes; tool results render into the next turn's
prompt."""

import json

import jsonschema
import openai
import pytest
from reference import ENGINE
from stack import Stack
from transformers import AutoTokenizer

from baton.gateway.tools import load_template

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module", params=["hermes", "mistral", "llama3_json"])
def fmt(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_text_model, fmt):
    s = Stack(
        tmp_path_factory.mktemp(f"tools-{fmt}") / "logs", tiny_text_model, *ENGINE,
        "--chat-template", fmt, "--tool-call-parser", fmt,
    )  # fmt: skip
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(stack):
    return stack.client()


def ask(client, stream=False, messages=ASK, **kw):
    kw = {"max_tokens": 400, **kw}
    return client.chat.completions.create(
        model="", messages=messages, tools=TOOLS, stream=stream, **kw
    )


def joined(chunks) -> tuple[str, list[dict], str]:
    """A stream's content, its calls joined by index (as the OpenAI SDK joins them), and the
    finish reason."""
    content, calls, finish = "", {}, None
    for c in chunks:
        choice = c.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": d.id, "name": "", "arguments": ""})
            call["name"] += d.function.name or ""
            call["arguments"] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def check(calls, names) -> None:
    assert calls
    for call in calls:
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        assert call.id.startswith("call_")


@pytest.mark.parametrize(
    ("choice", "names"),
    [
        ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
        ("required", {"get_weather", "get_time"}),
    ],
    ids=["named", "required"],
)
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 9}])
def test_forced_calls_follow_their_functions_schemas_streamed_or_not(
    client, choice, names, sampling
):
    r = ask(client, tool_choice=choice, **sampling)
    assert r.choices[0].finish_reason == "tool_calls"
    check(r.choices[0].message.tool_calls, names)
    if isinstance(choice, dict):
        assert len(r.choices[0].message.tool_calls) == 1  # named: that one call
    content, calls, finish = joined(ask(client, stream=True, tool_choice=choice, **sampling))
    assert finish == "tool_calls" and not content.strip()
    want = [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls]
    assert [(c["name"], c["arguments"]) for c in calls] == want


def test_one_call_when_parallel_calls_are_off(client):
    r = ask(client, tool_choice="required", parallel_tool_calls=False, temperature=0)
    assert len(r.choices[0].message.tool_calls) == 1


def written(fmt: str, call: dict) -> tuple[str, str | None, str]:
    """An answer that makes `call` as `fmt` writes it, with some text before where the
    format allows: (the answer, its content, its streamed content)."""
    args = json.dumps(call["arguments"])
    if fmt == "hermes":
        body = f'<tool_call>\n{{"name": "{call["name"]}", "arguments": {args}}}\n</tool_call>'
        return "Let me check.\n" + body, "Let me check.", "Let me check.\n"
    if fmt == "mistral":
        body = f'[TOOL_CALLS] [{{"name": "{call["name"]}", "arguments": {args}}}]'
        return "Let me check." + body, "Let me check.", "Let me check."
    return f'{{"name": "{call["name"]}", "parameters": {args}}}', None, ""


def test_auto_parses_the_call_the_model_writes(client, fmt):
    call = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": 2}}
    text, content, streamed = written(fmt, call)
    force = {"structured_outputs": {"grammar": f"start: {json.dumps(text)}"}}  # this text
    r = ask(client, tool_choice="auto", temperature=0, extra_body=force)
    message = r.choices[0].message
    assert message.content == content
    assert r.choices[0].finish_reason == "tool_calls"
    (got,) = message.tool_calls
    assert (got.function.name, json.loads(got.function.arguments)) == (
        call["name"], call["arguments"]
    )  # fmt: skip
    chunks = ask(client, stream=True, tool_choice="auto", temperature=0, extra_body=force)
    content, calls, finish = joined(chunks)
    assert content == streamed and finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        (call["name"], call["arguments"])
    ]
    # unforced, the tiny model writes text: it comes back as content, no calls
    r = ask(client, tool_choice="auto", temperature=0, max_tokens=8)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content


def test_tool_results_render_into_the_next_turn(client, tiny_text_model, fmt):
    turns = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
        {"role": "user", "content": "And tomorrow?"},
    ]  # fmt: skip
    r = ask(client, messages=turns, tool_choice="none", temperature=0, max_tokens=4)
    tokenizer = AutoTokenizer.from_pretrained(tiny_text_model)
    text = tokenizer.apply_chat_template(
        turns, tools=TOOLS, chat_template=load_template(fmt), tokenize=False,
        add_generation_prompt=True,
    )  # fmt: skip
    assert "sunny, 21 C" in text and '"name": "get_weather"' in text
    assert '{"city": "Paris"}' in text and "maxLength" in text  # the call, and the tools
    assert r.usage.prompt_tokens == len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_bad_tool_requests_are_400s_naming_the_parameter(client):
    named = {"type": "function", "function": {"name": "nope"}}
    bad = [
        ({"tools": TOOLS, "tool_choice": named}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
          "tool_choice": "required"}, "tools"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
         "tool_choice"),
    ]  # fmt: skip
    for kw, param in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="", messages=ASK, max_tokens=4, **kw)
        assert e.value.body["param"] == param, (kw, e.value.body)
