"""The real default model: SmolLM2-135M-Instruct from its GGUF, greedy chat answers identical
to transformers loading the same GGUF itself (fp32)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import baton
from baton.model.loader import default_model_path

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three colors.",
    "Explain gravity to a child in two sentences.",
]


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return baton.LLM(str(default_model_path()), dtype="float32", num_blocks=256)


def test_chat_greedy_matches_transformers_on_the_gguf(smol):
    tok = smol.tokenizer
    chats = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in QUESTIONS
    ]
    params = baton.SamplingParams(max_tokens=24, temperature=0)
    outs = smol.generate(chats, params)
    gguf = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    for out in outs:
        ids = torch.tensor([out.prompt_token_ids])
        # explicit mask: the prompt contains <|im_end|>, which is also the pad token
        mask = torch.ones_like(ids)
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
        assert out.outputs[0].token_ids == ref[0, ids.shape[1] :].tolist()
    assert outs[0].outputs[0].text == "The capital of France is Paris."
    assert outs[0].outputs[0].finish_reason == "stop"


def test_stop_strings_cut_the_text_and_are_not_returned(smol):
    chat = smol.tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True, tokenize=False
    )
    (out,) = smol.generate(
        chat, baton.SamplingParams(max_tokens=24, temperature=0, stop=("Paris",))
    )
    assert out.outputs[0].text == "The capital of France is "
    assert out.outputs[0].finish_reason == "stop"
    # a stop string that spans two tokens (" of" + " France") is found across the boundary
    (out,) = smol.generate(chat, baton.SamplingParams(max_tokens=24, temperature=0, stop=("f Fr",)))
    assert out.outputs[0].text == "The capital o"
