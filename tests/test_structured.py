"""Structured outputs (`response_format`) through real stacks with the official client: every
answer parses and follows its JSON schema, streamed or not; the prefill samples the first
token under the grammar; the same constrained greedy answer comes split, aggregated, and
after its decode is killed mid-answer."""

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pytest
from reference import ENGINE
from stack import Stack

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "integer", "minimum": 10000, "maximum": 99999},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "kind": {"enum": ["cat", "dog"]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "address", "kind", "ok"],
    "additionalProperties": False,
}
SCORES = {
    "type": "array",
    "items": {"type": "integer", "minimum": -5, "maximum": 5},
    "minItems": 2,
    "maxItems": 6,
}
STORY = {  # long enough to be killed in the middle of
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 150, "maxLength": 200}},
    "required": ["story"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe a pet as JSON."}]


def fmt(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_text_model):
    root = tmp_path_factory.mktemp("structured")
    config = root / "baton.toml"  # every prompt to the prefill, even one a decode has cached
    config.write_text("[gateway]\ncached_prefill_tokens = 0\n")
    s = Stack(root / "logs", tiny_text_model, *ENGINE, "--config", str(config))
    yield s
    s.stop()


def answer(client, schema: dict, stream: bool = False, **kw) -> str:
    args = {"model": "", "messages": MESSAGES, "max_tokens": 300, "response_format": fmt(schema)}
    r = client.chat.completions.create(**args, **kw, stream=stream)
    if stream:
        return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    return r.choices[0].message.content


@pytest.mark.parametrize("schema", [PERSON, SCORES, STORY], ids=["nested", "array", "long"])
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 77}])
def test_every_answer_parses_and_follows_its_schema(stack, schema, sampling):
    print("sampling", sampling)
    client = stack.client()
    text = answer(client, schema, **sampling)
    jsonschema.validate(json.loads(text), schema)
    assert answer(client, schema, stream=True, **sampling) == text


def test_json_object_gives_an_object(stack):
    r = stack.client().chat.completions.create(
        model="", messages=MESSAGES, max_tokens=300, temperature=0,
        response_format={"type": "json_object"},
    )  # fmt: skip
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # an object may go on for ever: what came is one still open
        assert r.choices[0].message.content.lstrip().startswith("{")


@pytest.mark.parametrize(
    ("spec", "follows"),
    [
        ({"regex": "[0-9]{3}-[a-z]{2,4}"}, lambda t: re.fullmatch("[0-9]{3}-[a-z]{2,4}", t)),
        ({"choice": ["yes", "no", 'a "maybe"']}, lambda t: t in ("yes", "no", 'a "maybe"')),
        ({"grammar": 'root ::= "A" | "B" ("C")+'}, lambda t: re.fullmatch("A|BC+", t)),
        ({"json": SCORES}, lambda t: jsonschema.validate(json.loads(t), SCORES) is None),
    ],
    ids=["regex", "choice", "grammar", "json"],
)
def test_vllms_structured_outputs(stack, spec, follows):
    r = stack.client().completions.create(
        model="", prompt="Answer:", max_tokens=40, temperature=1.0, seed=5,
        extra_body={"structured_outputs": spec},
    )  # fmt: skip
    text = r.choices[0].text
    assert r.choices[0].finish_reason == "stop" and follows(text), text


def test_the_prefill_samples_the_first_token_under_the_grammar(stack):
    client = stack.client()
    kw = {"model": "", "messages": MESSAGES, "max_tokens": 1, "temperature": 0}
    free = client.chat.completions.create(**kw).choices[0].message.content
    first = client.chat.completions.create(**kw, response_format=fmt(SCORES))
    assert first.choices[0].message.content.startswith("[") and "[" not in free
    # that one token came from the prefill: the decode computes no prompt in this stack
    assert stack.metric("decode-0", "baton_local_prefills_total") == 0


def test_a_schema_that_cannot_compile_is_a_400_before_any_work(stack):
    client = stack.client()
    for bad in (
        fmt({"type": "nonsense"}),
        fmt({"$ref": "#/nowhere"}),
        {"type": "json_schema"},  # no schema
        {"type": "xml"},
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model="", messages=MESSAGES, max_tokens=4, response_format=bad
            )
        assert e.value.body["param"].startswith("response_format"), e.value.body
    for bad in (
        {"regex": "[0-9"},
        {"regex": "a", "choice": ["b"]},
        {"grammar": "root ::= missing"},
        {"grammar": "start: foo"},
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(
                model="", prompt="x", max_tokens=4, extra_body={"structured_outputs": bad}
            )
        assert e.value.body["param"] == "structured_outputs", e.value.body


def test_split_aggregated_and_failed_over_answers_are_the_same(stack, tmp_path, tiny_text_model):
    want = answer(stack.client(), STORY, temperature=0)
    jsonschema.validate(json.loads(want), STORY)
    aggregated = Stack(tmp_path / "agg", tiny_text_model, *ENGINE, prefill=0, decode=1)
    try:
        assert answer(aggregated.client(), STORY, temperature=0) == want
    finally:
        aggregated.stop()

    two = Stack(tmp_path / "two", tiny_text_model, *ENGINE, prefill=1, decode=2)
    try:
        texts = ["" for _ in range(4)]
        body = {"messages": MESSAGES, "max_tokens": 300, "temperature": 0, "stream": True,
                "response_format": fmt(STORY)}  # fmt: skip

        async def one(client, i):
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        msg = json.loads(line[6:])
                        assert "error" not in msg, msg
                        texts[i] += msg["choices"][0]["delta"].get("content") or ""

        async def main():
            async with httpx.AsyncClient(base_url=two.url, timeout=60) as client:
                task = asyncio.gather(*(one(client, i) for i in range(len(texts))))
                async with asyncio.timeout(30):
                    while min(map(len, texts)) < 20:  # every answer is inside its string
                        await asyncio.sleep(0.01)
                two.kill("decode-0")
                await task

        asyncio.run(main())
        assert texts == [want] * len(texts)
        assert two.metric("gateway", "baton_migrations_total") >= 1
    finally:
        two.stop()
