"""Sampling parameters on a tiny random model (fp32): each behaviour checked by its effect."""

import random

import pytest
import torch
from reference import adjusted
from transformers import AutoModelForCausalLM

import baton
from baton.request import Sequence
from baton.sampler import adjust
from baton.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return baton.LLM(str(tiny_llama), dtype="float32", block_size=4, num_blocks=256)


PROMPT = [5, 17, 99, 3, 250, 41, 7]
OTHERS = [[9, 8, 7], list(range(3, 40)), [100] * 12]


def tokens(llm, prompts, params):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    p = SamplingParams(max_tokens=20, temperature=1.0, seed=1234, ignore_eos=True)
    alone = tokens(llm, [PROMPT], p)[0]
    batched = tokens(llm, [*OTHERS, PROMPT], [SamplingParams(max_tokens=20)] * 3 + [p])[-1]
    assert alone == batched
    other_seed = tokens(llm, [PROMPT], SamplingParams(max_tokens=20, temperature=1.0, seed=99))
    assert other_seed[0] != alone


def test_a_resumed_seeded_request_goes_on_as_the_uninterrupted_one(llm):
    # what a decode does after a hand-off (token 0 came from the prefill) or a failover: the
    # tokens so far arrive with the prompt, and the rest must be what one service would draw
    p = SamplingParams(max_tokens=20, temperature=1.0, seed=1234, ignore_eos=True)
    alone = tokens(llm, [PROMPT], p)[0]
    for done in (1, 8):
        seq = Sequence(f"resumed-{done}", PROMPT + alone[:done], p, num_prompt_tokens=len(PROMPT))
        llm.scheduler.add(seq)
        while llm.scheduler.has_work:  # at most 20 - done tokens
            llm.step({})
        assert seq.output_token_ids == alone


def test_top_k_1_and_tiny_top_p_are_greedy(llm):
    greedy = tokens(llm, [PROMPT], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    for p in (
        SamplingParams(max_tokens=16, temperature=1.5, top_k=1, ignore_eos=True, seed=1),
        SamplingParams(max_tokens=16, temperature=1.5, top_p=1e-6, ignore_eos=True, seed=2),
        SamplingParams(max_tokens=16, temperature=1.5, min_p=1.0, ignore_eos=True, seed=3),
    ):
        assert tokens(llm, [PROMPT], p) == greedy


def test_top_k_limits_the_choice(llm, tiny_llama):
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    top3 = set(hf(torch.tensor([PROMPT])).logits[0, -1].topk(3).indices.tolist())
    firsts = {
        tokens(llm, [PROMPT], SamplingParams(max_tokens=1, temperature=5.0, top_k=3, seed=s))[0][0]
        for s in range(40)
    }
    assert firsts <= top3 and len(firsts) > 1


def test_logprobs_are_the_models_log_softmax(llm, tiny_llama):
    (out,) = llm.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0, logprobs=5))
    lp = out.outputs[0].logprobs[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    ref = hf(torch.tensor([PROMPT])).logits[0, -1].log_softmax(-1)
    top = ref.topk(5)
    assert [t for t, _ in lp.top] == top.indices.tolist()
    assert lp.token_id == top.indices[0] and abs(lp.logprob - top.values[0].item()) < 1e-4
    assert max(abs(a - b) for (_, a), b in zip(lp.top, top.values.tolist(), strict=True)) < 1e-4


def test_stop_token_ids_and_min_tokens(llm):
    first = tokens(llm, [PROMPT], SamplingParams(max_tokens=8, temperature=0))[0][0]
    (out,) = llm.generate(
        [PROMPT], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=(first,))
    )
    assert out.outputs[0].token_ids == [first] and out.outputs[0].finish_reason == "stop"
    p = SamplingParams(max_tokens=8, temperature=0, stop_token_ids=(first,), min_tokens=3)
    got = tokens(llm, [PROMPT], p)[0]
    assert len(got) >= 3 and first not in got[:3]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be >= 1, got 0"),
        ({"temperature": -1}, "temperature must be >= 0 and finite, got -1"),
        ({"top_p": 0}, r"top_p must be in \(0, 1\], got 0"),
        ({"top_k": 0}, "top_k must be >= 1, got 0"),
        ({"min_p": 2}, r"min_p must be in \[0, 1\], got 2"),
        ({"max_tokens": 4, "min_tokens": 5}, r"min_tokens must be in \[0, max_tokens=4\], got 5"),
        ({"logprobs": 50}, r"logprobs must be in \[0, 20\], got 50"),
    ],
)
def test_bad_sampling_values_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kw",
    [
        {"repetition_penalty": 1.7},
        {"repetition_penalty": 0.6},  # below 1 favours what was seen
        {"frequency_penalty": 1.3},
        {"presence_penalty": -0.8},
        {"logit_bias": ((3, 100.0), (7, -100.0), (11, 2.5))},
        {"repetition_penalty": 1.2, "frequency_penalty": 0.5, "presence_penalty": 0.3},
    ],
)
def test_bias_and_penalties_follow_vllms_formulas_on_the_same_logits(kw):
    seed = 812
    print("seed", seed)
    rng = random.Random(seed)
    logits = [rng.gauss(0, 3) for _ in range(64)]  # both signs: repetition treats them apart
    prompt = [rng.randrange(64) for _ in range(20)]
    out = [rng.randrange(64) for _ in range(30)]  # repeats: counts above 1
    seq = Sequence("r", prompt + out, SamplingParams(**kw), num_prompt_tokens=len(prompt))
    row = torch.tensor(logits)
    adjust(row, seq)
    p = seq.params
    want = adjusted(
        logits, prompt, out, p.logit_bias, p.repetition_penalty, p.frequency_penalty,
        p.presence_penalty,
    )  # fmt: skip
    assert torch.allclose(row, torch.tensor(want), atol=1e-5)
    assert not torch.allclose(row, torch.tensor(logits))


def test_a_temperature_too_small_to_divide_by_is_greedy(llm):
    # logits / 1e-30 overflow to NaN: sampling them gave token 0 at every step
    greedy = tokens(llm, [PROMPT], SamplingParams(max_tokens=8, temperature=0))
    assert tokens(llm, [PROMPT], SamplingParams(max_tokens=8, temperature=1e-30)) == greedy
