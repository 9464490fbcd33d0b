"""The real model behind the real stack: SmolLM2 (fp32) through `baton up`, driven by the
official openai client, streaming; greedy tokens equal transformers'."""

import openai
import pytest
import torch
from openai import OpenAI
from stack import Stack
from transformers import AutoModelForCausalLM

QUESTIONS = ["What is the capital of France?", "List three colors.", "Say hello in Spanish."]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, smollm2_dir):
    s = Stack(
        tmp_path_factory.mktemp("smol") / "logs",
        smollm2_dir,
        "--num-blocks",
        "256",
        "--api-key",
        "sk-test",
    )
    yield s
    s.stop()


def test_openai_client_streams_transformers_greedy_chat(stack, smollm2_dir):
    client = OpenAI(base_url=f"{stack.url}/v1", api_key="sk-test")
    model = client.models.list().data[0].id
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    for q in QUESTIONS:
        messages = [{"role": "user", "content": q}]
        chunks = list(
            client.chat.completions.create(
                model=model, messages=messages, max_tokens=20, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"return_token_ids": True},
            )
        )  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        ids = [t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"]]
        x = torch.tensor([client_prompt_ids(smollm2_dir, messages)])
        ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=20, do_sample=False)
        assert ids == ref[0, x.shape[1] :].tolist()
        assert chunks[-1].usage.completion_tokens == len(ids)
        if q == QUESTIONS[0]:
            assert text == "The capital of France is Paris."


def client_prompt_ids(model_dir, messages) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(enc["input_ids"])


def test_api_key_models_health_and_metrics(stack):
    import httpx

    assert httpx.get(f"{stack.url}/health").status_code == 200  # open without a key
    assert httpx.get(f"{stack.url}/v1/models").status_code == 401
    auth = {"Authorization": "Bearer sk-test"}
    models = httpx.get(f"{stack.url}/v1/models", headers=auth).json()
    assert models["data"][0]["object"] == "model"
    metrics = httpx.get(f"{stack.url}/metrics", headers=auth).text
    assert (
        "baton_ttft_seconds_bucket" in metrics
        and 'baton_service_kv_blocks_total{role="decode"' in metrics
    )
