"""The real default model: SmolLM2-135M-Instruct from its GGUF, greedy chat answers identical
to transformers loading the same GGUF itself (fp32), and bf16 serving as near fp32 as
transformers' bf16."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import baton
from baton.model.files import default_model_path

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


def test_bf16_serving_is_as_close_to_fp32_as_transformers_bf16(smollm2_dir):
    """The dtype `baton up` serves, through the C kernels where this CPU has them (projections,
    prefill attention over cached chunks, decode attention, norm, rotary): each generated
    token's logprob lies as near transformers' fp32 one as transformers' own bf16 does (within
    twice its largest error), both scored on the same tokens."""
    gguf = default_model_path()
    # a 48-token budget: four prompts of ~130 tokens prefill in chunks over cached ones
    llm = baton.LLM(str(gguf), dtype="bfloat16", num_blocks=256, max_num_batched_tokens=48)
    system = "You are a helpful assistant. Answer briefly, in plain words. " * 8
    chats = [
        llm.tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": q}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for q in QUESTIONS
    ]
    outs = llm.generate(chats, baton.SamplingParams(max_tokens=16, temperature=0, logprobs=0))
    fp32 = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    ours, theirs = [], []
    for out in outs:
        prompt, tokens = out.prompt_token_ids, out.outputs[0].token_ids
        at = torch.arange(len(prompt) - 1, len(prompt) + len(tokens) - 1)  # predicting each
        ids = torch.tensor([prompt + tokens])
        with torch.inference_mode():
            want, hf = (m(ids).logits[0, at].float().log_softmax(-1) for m in (fp32, bf16))
        want, hf = (x[torch.arange(len(tokens)), tokens] for x in (want, hf))
        got = torch.tensor([lp.logprob for lp in out.outputs[0].logprobs])
        ours.append((got - want).abs().max())
        theirs.append((hf - want).abs().max())
    assert max(ours) <= 2 * max(theirs), (ours, theirs)
