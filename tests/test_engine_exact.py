"""baton.LLM against transformers: greedy tokens identical, chunked prefill and prefix hits
giving the same logits as a one-shot prefill (fp32, tiny random models)."""

import pytest
import torch
from tiny_models import make_tiny_model
from transformers import AutoModelForCausalLM

import baton
from baton.cache.kv_manager import KVCacheManager
from baton.request import Sequence
from baton.sampling_params import SamplingParams
from baton.scheduler import SampledToken, Scheduler

LENGTHS = [1, 3, 9, 17, 30, 5, 12, 40]
NEW = 32


def prompts(vocab: int, lengths=LENGTHS, seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model_dir, token_lists, new_tokens) -> list[list[int]]:
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf.generation_config.eos_token_id = None  # run the full length, like ignore_eos
    hf.generation_config.pad_token_id = 0
    out = []
    for ids in token_lists:
        full = hf.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)
        out.append(full[0, len(ids) :].tolist())
    return out


VARIANTS = {
    "llama-tied-gqa4": ("llama", {}),
    "llama-untied-mha": ("llama", {"tie_word_embeddings": False, "num_key_value_heads": 8}),
    "qwen2-bias-gqa2": ("qwen2", {}),
    "mistral-gqa8-hd16": ("mistral", {}),
    "qwen3-qk-norm-gqa4-hd32": ("qwen3", {}),
    "qwen3-tied-mha-hd32": ("qwen3", {"tie_word_embeddings": True, "num_key_value_heads": 8}),
    "phi3-fused-gqa4": ("phi3", {}),
    # served below the original length, where transformers uses the short factors
    "phi3-longrope": (
        "phi3",
        {
            "original_max_position_embeddings": 256,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0, 1.5, 2.0, 4.0],
                "long_factor": [2.0] * 4,
            },
        },
    ),
    "qwen3-moe-top2of4-normed": ("qwen3_moe", {}),
    "qwen3-moe-top2of4-raw-sparse-step2": (
        "qwen3_moe",
        {"norm_topk_prob": False, "mlp_only_layers": [], "decoder_sparse_step": 2},
    ),
    "mixtral-top2of4": ("mixtral", {}),
    "gemma2-sliding8-softcapped-gqa4": ("gemma2", {}),
    "gemma2-untied-mha-hd16": ("gemma2", {"tie_word_embeddings": False, "num_key_value_heads": 8}),
    "gemma3-sliding8-local-rope-qk-norm": ("gemma3", {}),
    "mistral-sliding8": ("mistral", {"sliding_window": 8}),
    "qwen2-sliding8-above-layer1": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
    ),
}


def variant_llm(tiny_root, variant: str) -> tuple[baton.LLM, object]:
    """The variant's tiny model and an LLM over it with small blocks and budget, so that
    prompts are chunked across block boundaries and batches mixed."""
    family, overrides = VARIANTS[variant]
    model_dir = make_tiny_model(tiny_root / variant, family, **overrides)
    llm = baton.LLM(
        str(model_dir), dtype="float32", block_size=4, num_blocks=128, max_num_batched_tokens=24
    )
    return llm, model_dir


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_matches_transformers_token_for_token(tiny_root, variant):
    llm, model_dir = variant_llm(tiny_root, variant)
    token_lists = prompts(llm.engine.model.args.vocab_size)
    outs = llm.generate(token_lists, SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True))
    got = [o.outputs[0].token_ids for o in outs]
    assert got == hf_greedy(model_dir, token_lists, NEW)
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert llm.engine.kv_manager.pool.num_used == 0


def test_where_every_layer_slides_a_pool_smaller_than_the_requests_serves_them_exactly(
    tiny_root,
):
    """Mistral's window of 8: the blocks behind it go back and are taken again (by the other
    sequences) while the batch runs: 40 blocks of 4 for requests that span 97."""
    model_dir = make_tiny_model(tiny_root / "mistral-sliding8", "mistral", sliding_window=8)
    llm = baton.LLM(
        str(model_dir), dtype="float32", block_size=4, num_blocks=40, max_num_batched_tokens=24
    )
    token_lists = prompts(llm.engine.model.args.vocab_size)
    assert sum(-(-(len(ids) + NEW) // 4) for ids in token_lists) == 97
    outs = llm.generate(token_lists, SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(model_dir, token_lists, NEW)
    assert llm.engine.kv_manager.pool.num_used == 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_logprobs_equal_transformers_log_softmax_at_every_step(tiny_root, variant):
    # greedy tokens alone would pass a model whose logits are off by any monotonic function
    # (a missing final soft-cap, a wrong temperature of the scores' scale in one layer)
    llm, model_dir = variant_llm(tiny_root, variant)
    token_lists = prompts(llm.engine.model.args.vocab_size, [9, 30])
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for ids, out in zip(token_lists, llm.generate(token_lists, params), strict=True):
        new = out.outputs[0].token_ids
        ref = hf(torch.tensor([ids + new])).logits[0, len(ids) - 1 : -1].log_softmax(-1)
        expected = ref.gather(1, torch.tensor(new).unsqueeze(1)).squeeze(1)
        got = torch.tensor([lp.logprob for lp in out.outputs[0].logprobs])
        assert (got - expected).abs().max() < 1e-4


def final_logits(llm, kv: KVCacheManager, tokens: list[int], budget: int):
    """Run one prompt through the runner in chunks of `budget`; return the logits of its last
    position and the number of tokens the first step computed."""
    sched = Scheduler(
        kv,
        max_num_seqs=1,
        max_num_batched_tokens=budget,
        max_model_len=llm.engine.max_model_len,
        eos_token_ids=llm.engine.eos_token_ids,
    )
    seq = Sequence("x", list(tokens), SamplingParams(max_tokens=1))
    sched.add(seq)
    first = None
    while True:
        batch = sched.schedule()
        first = first or batch[0].num_new_tokens
        logits, sampling = llm.engine.runner.compute_logits(batch)
        sched.postprocess(batch, [SampledToken(0) if b.samples else None for b in batch])
        if sampling:
            return logits[0], first


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def tiny_llm(request, tiny_root):
    """Llama, and Gemma 2: its sliding layers' window (8) ends inside chunks and cached blocks."""
    model_dir = make_tiny_model(tiny_root / "chunked", request.param)
    return baton.LLM(str(model_dir), dtype="float32", block_size=4, num_blocks=64)


@pytest.mark.parametrize("chunk", [1, 3, 4, 5, 13])
def test_chunked_prefill_gives_one_shot_logits(tiny_llm, chunk):
    (tokens,) = prompts(512, [37])
    fresh = lambda: KVCacheManager(64, 4, enable_prefix_caching=False)  # noqa: E731
    whole, _ = final_logits(tiny_llm, fresh(), tokens, budget=64)
    chunked, first = final_logits(tiny_llm, fresh(), tokens, budget=chunk)
    assert first == chunk
    assert (whole - chunked).abs().max() < 1e-4


def test_prefix_cache_hit_gives_one_shot_logits(tiny_llm):
    (a,) = prompts(512, [37])
    b = [*a[:30], 7, 8, 9, 10, 11]  # shares 7 full blocks of 4 with a
    cached = KVCacheManager(64, 4)
    final_logits(tiny_llm, cached, a, budget=64)
    hit, first = final_logits(tiny_llm, cached, b, budget=64)
    assert first == len(b) - 28  # only the tail past the 7 cached blocks was computed
    whole, _ = final_logits(tiny_llm, KVCacheManager(64, 4, enable_prefix_caching=False), b, 64)
    assert (whole - hit).abs().max() < 1e-4
