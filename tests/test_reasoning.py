"""Reasoning split from the answer (`--reasoning-parser think`): what a model writes between
an opening `<think>` and `</think>` is `reasoning_content`, counted as reasoning tokens; the
rest is `content`; streamed deltas join to the same, wherever the tags fall in the pieces."""

import random

import pytest
from reference import ENGINE
from stack import Stack

from baton.gateway.reasoning import split

SEED = 3131


@pytest.mark.parametrize("seed", range(5))
def test_the_split_is_the_same_wherever_the_pieces_break(seed):
    print("seed", SEED + seed)
    rng = random.Random(SEED + seed)
    text = "<think>first, 2 < 3; then </thi nk>?</think>The answer is <b>4</b>."
    cuts = sorted(rng.sample(range(1, len(text)), rng.randrange(1, 20)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    reasoning, content, tokens = split(pieces)
    assert (reasoning, content) == ("first, 2 < 3; then </thi nk>?", "The answer is <b>4</b>.")
    assert 1 <= tokens <= len(pieces)
    assert split(["The answer", " <think>is</think>"]) == (
        None, "The answer <think>is</think>", 0
    )  # fmt: skip
    assert split(["<thi", "nk>still thinking", " when cut </th"]) == (
        "still thinking when cut </th", "", 3
    )  # fmt: skip


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_text_model):
    root = tmp_path_factory.mktemp("reasoning")
    s = Stack(root / "logs", tiny_text_model, *ENGINE, "--reasoning-parser", "think")
    yield s.client()
    s.stop()


def test_thinking_comes_as_reasoning_content_streamed_or_not(client):
    # the tiny model thinks when a grammar makes it: a thought of 5-40 letters, then a word
    grammar = 'start: "<think>" /[a-z ]{5,40}/ "</think>" /[A-Z][a-z]{2,8}/'
    kw = {"model": "", "messages": [{"role": "user", "content": "Think first."}],
          "max_tokens": 80, "temperature": 0,
          "extra_body": {"structured_outputs": {"grammar": grammar}}}  # fmt: skip
    r = client.chat.completions.create(**kw)
    message = r.choices[0].message
    thought, answer = message.reasoning_content, message.content
    assert thought and 5 <= len(thought) <= 40 and "<think>" not in thought
    assert answer and answer[0].isupper() and "</think>" not in answer
    details = r.usage.completion_tokens_details
    assert 0 < details.reasoning_tokens < r.usage.completion_tokens
    reasoning = content = ""
    chunks = client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}
    )
    for chunk in chunks:
        if chunk.choices:
            delta = chunk.choices[0].delta
            reasoning += getattr(delta, "reasoning_content", None) or ""
            content += delta.content or ""
        else:
            assert chunk.usage.completion_tokens_details.reasoning_tokens == (
                details.reasoning_tokens
            )
    assert (reasoning, content) == (thought, answer)


def test_an_answer_that_does_not_think_is_all_content(client):
    r = client.chat.completions.create(
        model="", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0
    )
    message = r.choices[0].message
    assert getattr(message, "reasoning_content", None) is None and message.content
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
