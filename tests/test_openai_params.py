"""OpenAI's request parameters through a 1P+1D stack, with the official client: every field is
implemented, accepted as harmless, or a 400 naming it; logit bias and the penalties sample as
vLLM's formulas say, on the prefill (the first token) and the decode (the rest) alike."""

import random
from collections import Counter

import httpx
import openai
import pytest
import torch
from reference import ENGINE, adjusted
from stack import Stack
from transformers import AutoModelForCausalLM

SEED = 2112
NUM_BLOCKS = 48  # x 16 tokens: a pool smaller than the model's context of 1,024
FLAGS = [f if f != "160" else str(NUM_BLOCKS) for f in ENGINE]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_text_model):
    s = Stack(tmp_path_factory.mktemp("params") / "logs", tiny_text_model, *FLAGS)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(stack):
    return stack.client()


def prompt(n: int, seed: int = SEED) -> list[int]:
    print("seed", seed)
    rng = random.Random(seed)
    return [rng.randrange(3, 49152) for _ in range(n)]


def greedy(client, ids: list[int], n: int, **kw) -> list[int]:
    r = client.completions.create(
        model="",
        prompt=ids,
        max_tokens=n,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True, **kw},
    )
    return r.choices[0].token_ids


def reference(model_dir, ids: list[int], n: int, bias=(), rep=1.0, freq=0.0, pres=0.0):
    """Greedy tokens of transformers' fp32 logits, adjusted as the formulas say."""
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            logits = hf(torch.tensor([ids + out])).logits[0, -1].tolist()
        logits = adjusted(logits, ids, out, bias, rep, freq, pres)
        out.append(max(range(len(logits)), key=logits.__getitem__))
    return out


def test_penalties_and_bias_sample_as_the_formulas_say(client, tiny_text_model):
    ids = prompt(40)
    # the bias makes a prompt token the model's favourite; each penalty then pushes it down
    bias = {str(ids[0]): 7.0, "100": -2.0}
    pairs = [(ids[0], 7.0), (100, -2.0)]
    biased = greedy(client, ids, 16, logit_bias=bias)
    assert biased == reference(tiny_text_model, ids, 16, pairs)
    assert biased != greedy(client, ids, 16) and ids[0] in biased
    for name, short, value in [
        ("repetition_penalty", "rep", 2.0),
        ("frequency_penalty", "freq", 1.5),
        ("presence_penalty", "pres", 2.0),
    ]:  # each one alone, against its own formula, and then all three
        got = greedy(client, ids, 16, logit_bias=bias, **{name: value})
        assert got == reference(tiny_text_model, ids, 16, pairs, **{short: value}), name
        assert got != biased, name  # it changed the output
    kw = {"repetition_penalty": 1.3, "frequency_penalty": 0.7, "presence_penalty": 0.4}
    got = greedy(client, ids, 24, logit_bias=bias, **kw)
    assert got == reference(tiny_text_model, ids, 24, pairs, 1.3, 0.7, 0.4)


def test_logit_bias_minus_100_bans_a_token_and_plus_100_forces_one(client):
    ids = prompt(20, SEED + 1)
    plain = greedy(client, ids, 16)
    common = Counter(plain).most_common(1)[0][0]
    banned = greedy(client, ids, 16, logit_bias={str(common): -100})
    assert common not in banned
    assert greedy(client, ids, 8, logit_bias={"1234": 100}) == [1234] * 8


def test_a_parameter_that_is_not_implemented_is_a_400_naming_it(client, stack):
    chat = {"model": "", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    refused = {
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "tool_choice": "auto",
        "functions": [{"name": "f", "parameters": {}}],  # the deprecated tools
        "reasoning_effort": "low",
        "store": True,
        "frobnicate": 1,
    }
    for name, value in refused.items():
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**chat, extra_body={name: value})
        assert e.value.body["param"].split(".")[0] == name, e.value.body
    with httpx.Client(base_url=stack.url) as c:
        for name, value in {"suffix": "x", "best_of": 2}.items():
            r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, name: value})
            assert r.status_code == 400 and r.json()["error"]["param"] == name
        bad = {
            "logit_bias": {"99999999": 1},  # outside the vocabulary
            "presence_penalty": 2.5,
            "repetition_penalty": 0,
        }
        for name, value in bad.items():
            r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, name: value})
            assert r.status_code == 400 and r.json()["error"]["param"] == name, r.json()
        for bias in ({"not-an-id": 1}, {"5": 101}):
            r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "logit_bias": bias})
            assert r.status_code == 400, bias
            assert r.json()["error"]["param"].startswith("logit_bias"), r.json()


def test_harmless_parameters_are_accepted_and_change_nothing(client):
    ids = prompt(12, SEED + 2)
    harmless = {
        "user": "u-1",
        "metadata": {"team": "agents"},
        "store": False,
        "service_tier": "auto",
        "prompt_cache_key": "k",
        "safety_identifier": "s",
        "response_format": {"type": "text"},
    }
    assert greedy(client, ids, 8, **harmless) == greedy(client, ids, 8)


def test_content_parts_are_joined_and_an_image_is_a_400(client):
    parts = [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "a story."}]
    kw = {"model": "", "max_tokens": 8, "temperature": 0}
    joined = client.chat.completions.create(
        messages=[{"role": "user", "content": "Tell me\na story."}], **kw
    )
    got = client.chat.completions.create(messages=[{"role": "user", "content": parts}], **kw)
    assert got.choices[0].message.content == joined.choices[0].message.content
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(messages=[{"role": "user", "content": [image]}], **kw)
    assert e.value.body["param"] == "messages.0.content" and "text only" in e.value.message


def test_without_max_tokens_a_choice_runs_to_the_end_of_what_the_pool_holds(client):
    ids = prompt(700, SEED + 3)
    r = client.completions.create(
        model="", prompt=ids, temperature=0, extra_body={"ignore_eos": True}
    )
    # the decode's pool (48 blocks of 16) holds 768 tokens, fewer than the model's 1,024
    assert r.usage.completion_tokens == NUM_BLOCKS * 16 - 700
    assert r.choices[0].finish_reason == "length"


def test_a_request_the_decode_pool_cannot_hold_is_a_400_before_any_work(client):
    # 700 + 100 tokens fit the model's context (1,024) but not the decode's pool (768)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="", prompt=prompt(700, SEED + 4), max_tokens=100)
    assert "a decode's KV pool holds 768" in e.value.message
    assert e.value.body["param"] == "max_tokens"


def test_echo_puts_the_prompt_before_the_completion(client):
    kw = {"model": "", "max_tokens": 6, "temperature": 0}
    plain = client.completions.create(prompt="Once upon a time", **kw).choices[0].text
    echoed = client.completions.create(prompt="Once upon a time", echo=True, **kw)
    assert echoed.choices[0].text == "Once upon a time" + plain
    chunks = client.completions.create(prompt="Once upon a time", echo=True, stream=True, **kw)
    assert "".join(c.choices[0].text for c in chunks) == "Once upon a time" + plain
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(prompt="x", echo=True, logprobs=1, **kw)
    assert e.value.body["param"] == "echo"


def kv_bytes(stack) -> float:
    return stack.metric("decode-0", "baton_kv_bytes_received_total")


def test_n_choices_share_one_hand_off_of_their_prompt(client, stack):
    ids = prompt(70, SEED + 4)  # 4 full blocks and a part
    before = kv_bytes(stack)
    (one,) = client.completions.create(
        model="", prompt=ids, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    ).choices
    single = kv_bytes(stack) - before
    ids = prompt(70, SEED + 5)  # as long, and new to the stack
    before = kv_bytes(stack)
    r = client.completions.create(
        model="", prompt=ids, max_tokens=8, temperature=0, n=4, extra_body={"ignore_eos": True}
    )
    assert kv_bytes(stack) - before == single > 0  # the prompt's KV moved once, not 4 times
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert len({c.text for c in r.choices}) == 1  # greedy: four times the same
    assert r.usage.prompt_tokens == 70 and r.usage.completion_tokens == 32
    assert (
        r.choices[0].text
        == client.completions.create(
            model="", prompt=ids, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    assert one.text  # (the single run's own output, read)


def test_seeded_choices_are_reproducible_and_streamed_alike(client):
    kw = {"model": "", "prompt": "Once upon a time", "max_tokens": 10, "n": 3,
          "temperature": 1.0, "seed": 41}  # fmt: skip
    first = [c.text for c in sorted(client.completions.create(**kw).choices, key=lambda c: c.index)]
    assert len(set(first)) == 3  # the choices draw from seeds 41, 42, 43
    again = [c.text for c in sorted(client.completions.create(**kw).choices, key=lambda c: c.index)]
    assert again == first
    streamed = ["", "", ""]
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == first


def test_n_over_the_cap_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="", prompt="x", max_tokens=2, n=9)
    assert e.value.body["param"] == "n"


def test_session_headers_keep_the_kv_and_bad_ones_are_a_400(client, stack):
    chat = {"model": "", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers in (
        {"x-session-id": "a", "x-session-ttl-s": "soon"},
        {"x-session-id": "a", "x-session-ttl-s": "-1"},
        {"x-session-id": "a", "x-session-ttl-s": "inf"},
        {"x-session-ttl-s": "60"},  # a retention with no session to keep
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**chat, extra_headers=headers)
        assert e.value.body["param"] == "x-session-ttl-s", e.value.body
    before = stack.metric("decode-0", "baton_kv_retained_blocks")
    client.completions.create(
        model="",
        prompt=prompt(70, seed=SEED + 9),
        max_tokens=2,
        extra_headers={"x-session-id": "a"},
    )
    assert stack.metric("decode-0", "baton_kv_retained_blocks") > before
    assert stack.metric("gateway", "baton_live_sessions") == 1  # "a", within its 300 s
