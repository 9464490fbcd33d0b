"""Model families beyond Llama, Mistral and Qwen2 through the whole stack: a tiny random-weight
model of each (Gemma's with sliding layers shorter than most prompts), with SmolLM2's
tokenizer, served by `baton up` as one prefill and one decode over the default transport,
gives transformers' greedy tokens (fp32). baton.LLM's side of the
same models is in test_engine_exact.py. What a family's config asks that Baton cannot serve
exactly is refused or capped, by name."""

import asyncio
import random
import shutil

import httpx
import pytest
import torch
from reference import ENGINE, hf_greedy
from stack import Stack
from tiny_models import SPM_IDS, gguf_of, make_tiny_model
from transformers import AutoConfig, Phi3Config

import baton
from baton.cache.kv_cache import block_nbytes, full_layer_ranges
from baton.model.files import resolve_model_dir
from baton.model.loader import gguf_config
from baton.model.registry import UnsupportedModel, model_args
from baton.sampling_params import SamplingParams

SEED = 24
NEW = 32
# 8 prompts of different lengths, one longer than the 32-token chunk budget of ENGINE
LENGTHS = [1, 3, 9, 17, 30, 5, 12, 70]


def prompts() -> list[list[int]]:
    print("seed", SEED)
    rng = random.Random(SEED)
    return [[rng.randrange(3, 49152) for _ in range(n)] for n in LENGTHS]


async def complete_all(url: str, token_lists) -> list[dict]:
    body = {"max_tokens": NEW, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        rs = await asyncio.gather(
            *(client.post("/v1/completions", json={**body, "prompt": p}) for p in token_lists)
        )
    return [r.json() for r in rs]


def handed_off_bytes(model_dir, token_lists: list[list[int]], block_size: int = 16) -> int:
    """The fp32 KV bytes a decode reads for these prompts, each handed off: the blocks their
    tokens fill, but where some layers slide, the leading blocks no query of the decode's
    sees through those layers (the first it computes, at len(ids), sees from len(ids) -
    window + 1) only in the other layers' ranges."""
    args = model_args(AutoConfig.from_pretrained(model_dir))
    whole = block_nbytes(args, block_size, torch.float32)
    part = sum(size for _, size in full_layer_ranges(args, block_size, torch.float32))
    total = 0
    for ids in token_lists:
        blocks = -(-len(ids) // block_size)
        behind = 0
        if args.sliding_layers:
            behind = max(0, len(ids) - args.sliding_window + 1) // block_size
        total += behind * part + (blocks - behind) * whole
    return total


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "mixtral", "phi3", "gemma2", "gemma3"])
def test_one_prefill_one_decode_serve_each_family_token_exact(
    tmp_path, tiny_root, smollm2_dir, family
):
    model = make_tiny_model(tiny_root / "families", family, tokenizer_from=smollm2_dir)
    token_lists = prompts()
    expected = hf_greedy(model, token_lists, NEW)
    stack = Stack(tmp_path / "logs", model, *ENGINE)
    try:
        results = asyncio.run(complete_all(stack.url, token_lists))
        assert [r["choices"][0]["token_ids"] for r in results] == expected
        decode = next(iter(stack.services("decode")))
        # every prompt was handed off, Gemma's without what its sliding layers left behind
        received = stack.metric(decode, "baton_kv_bytes_received_total")
        assert received == handed_off_bytes(model, token_lists)
        assert set(stack.wait_blocks_free().values()) == {0}
    finally:
        stack.stop()


def test_phi3_longrope_is_served_only_below_its_original_length():
    # past it transformers turns to the long factors, which the keys cached before never saw
    config = Phi3Config(
        max_position_embeddings=4096,
        original_max_position_embeddings=256,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0] * 48,
            "long_factor": [2.0] * 48,
        },
    )
    args = model_args(config)
    assert args.max_position == 256
    assert args.rope_attention_scaling > 1  # longrope's attention factor, from transformers


def test_rotary_over_part_of_each_head_is_refused_by_name():
    config = Phi3Config(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.75})
    with pytest.raises(UnsupportedModel, match="partial_rotary_factor 0.75"):
        model_args(config)


# llama.cpp's Qwen3-MoE has no dense layers between the sparse ones; a GGUF does not say Gemma
# 3's layer pattern (every sixth layer global), nor Gemma's query_pre_attn_scalar: the head size
# (as the released models have it), but hidden / heads in the 27B ones, told by their layer count
# a Phi-3 of the 128k-context kind (as Phi-3.5-mini): short and long factors per rotary pair
PHI3_LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "original_max_position_embeddings": 256,
    "short_factor": [1.0, 1.125, 1.25, 1.5],
    "long_factor": [2.0, 3.0, 4.0, 5.0],
}
PHI3_128K = {"max_position_embeddings": 4096, "original_max_position_embeddings": 256}
GGUF_CASES = {
    "qwen3_moe": ("qwen3_moe", {"mlp_only_layers": []}),
    "gemma2": ("gemma2", {"query_pre_attn_scalar": 16}),
    "gemma3": (
        "gemma3",
        {"num_hidden_layers": 6, "layer_types": None, "query_pre_attn_scalar": 32},
    ),
    "phi3": ("phi3", {**PHI3_128K, "rope_parameters": PHI3_LONGROPE}),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_a_gguf_from_llama_cpps_converter_serves_its_checkpoints_tokens(
    tmp_path, tiny_root, smollm2_dir, sentencepiece_model, gguf_converter, monkeypatch, case
):
    """Qwen3-MoE's head size (32 here) and expert width, Gemma 2's soft-caps and Phi-3's
    longrope factors are read from the file, and Gemma's query scale told from its shape as
    llama.cpp tells it: transformers' GGUF reader leaves them at the family's defaults (plain
    rope for Phi-3)."""
    family, shape = GGUF_CASES[case]
    root = tiny_root / "gguf" / case
    if family.startswith("qwen3"):  # a BPE tokenizer, as Qwen's
        model = make_tiny_model(root, family, tokenizer_from=smollm2_dir, **shape)
    else:
        model = make_tiny_model(root, family, **SPM_IDS, **shape)
        shutil.copy(sentencepiece_model, model / "tokenizer.model")
    gguf = gguf_of(gguf_converter, model, tmp_path / f"{case}.gguf")
    monkeypatch.setenv("BATON_CACHE", str(tmp_path / "cache"))
    token_lists = [[t % 500 + 4 for t in ids] for ids in prompts()[:4]]
    served = resolve_model_dir(gguf)
    # what the file states is what is served (soft-caps pass greedy decoding unnoticed)
    original, converted = AutoConfig.from_pretrained(model), AutoConfig.from_pretrained(served)
    for name in ("head_dim", "moe_intermediate_size", "attn_logit_softcapping",
                 "final_logit_softcapping", "sliding_window", "query_pre_attn_scalar"):  # fmt: skip
        assert getattr(converted, name, None) == getattr(original, name, None), name
    rope = {"rope_type", "short_factor", "long_factor", "original_max_position_embeddings"}
    assert {k: v for k, v in converted.rope_parameters.items() if k in rope} == {
        k: v for k, v in original.rope_parameters.items() if k in rope
    }
    llm = baton.LLM(str(served), dtype="float32")
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)  # past the window
    got = [o.outputs[0].token_ids for o in llm.generate(token_lists, params)]
    assert got == hf_greedy(model, token_lists, 24)


def test_a_gemma_27b_gguf_scales_queries_by_hidden_over_heads_as_llama_cpp_does(
    tmp_path, tiny_root, sentencepiece_model, gguf_converter
):
    """Gemma 2 27B (46 layers) scales queries by 1 / sqrt(hidden / heads), not by the head
    size; a GGUF does not say it, so its layer count does (the case above: the head size)."""
    model = make_tiny_model(tiny_root / "gguf" / "27b", "gemma2", **SPM_IDS,
                            num_hidden_layers=46, query_pre_attn_scalar=64 // 8)  # fmt: skip
    shutil.copy(sentencepiece_model, model / "tokenizer.model")
    gguf = gguf_of(gguf_converter, model, tmp_path / "gemma2-27b.gguf")
    assert (
        gguf_config(gguf).query_pre_attn_scalar == 8 != AutoConfig.from_pretrained(model).head_dim
    )


def test_a_gguf_transformers_reads_only_in_part_is_refused_not_served(
    tmp_path, tiny_root, sentencepiece_model, gguf_converter, monkeypatch
):
    """llama.cpp writes Mixtral as `llama` with experts; transformers reads that as a dense
    Llama whose MLPs it cannot fill, and would initialize them at random."""
    model = make_tiny_model(tiny_root / "gguf", "mixtral", **SPM_IDS)
    shutil.copy(sentencepiece_model, model / "tokenizer.model")
    gguf = gguf_of(gguf_converter, model, tmp_path / "mixtral.gguf")
    monkeypatch.setenv("BATON_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UnsupportedModel, match=r"leaves 9 weights unset \(model.layers.0.mlp"):
        resolve_model_dir(gguf)
