"""Tiny random-weight models of each supported family, saved as Hugging Face directories."""

import subprocess
import sys
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

# a vocabulary of the conftest's 512-piece SentencePiece model (tokenizer.model), which
# llama.cpp's converter needs for Gemma and Phi-3 and reads in a moment
SPM_IDS = {"vocab_size": 512, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}

COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    # wider than the default init so the logits have clear winners and greedy decoding
    # does not hinge on 1e-7 ties
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILIES = {
    "llama": lambda **kw: LlamaConfig(**{**COMMON, "tie_word_embeddings": True, **kw}),
    "qwen2": lambda **kw: Qwen2Config(**{**COMMON, "num_key_value_heads": 4, **kw}),
    "mistral": lambda **kw: MistralConfig(
        **{**COMMON, "num_key_value_heads": 1, "head_dim": 16, "sliding_window": None, **kw}
    ),
    # heads of 32 dims: q is wider (256) than the hidden size (64)
    "qwen3": lambda **kw: Qwen3Config(**{**COMMON, "head_dim": 32, **kw}),
    # Phi3Config's default pad token (32000) lies outside the tiny vocabulary
    "phi3": lambda **kw: Phi3Config(**{**COMMON, "pad_token_id": 0, **kw}),
    # top-2 of 4 experts; layer 1 keeps a dense MLP
    "qwen3_moe": lambda **kw: Qwen3MoeConfig(
        **{
            **COMMON,
            "head_dim": 32,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "norm_topk_prob": True,
            "mlp_only_layers": [1],
            **kw,
        }
    ),
    "mixtral": lambda **kw: MixtralConfig(
        **{**COMMON, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None, **kw}
    ),
    # sliding layers (0 and 2) see 8 positions, fewer than most prompts; caps low enough that
    # tanh bends these random scores and logits
    "gemma2": lambda **kw: Gemma2Config(
        **{
            **COMMON,
            "head_dim": 16,
            "query_pre_attn_scalar": 24,
            "sliding_window": 8,
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 3.0,
            **kw,
        }
    ),
    # 2 sliding layers of 8 positions, rotated by their own (local) frequencies, around 1 global
    "gemma3": lambda **kw: Gemma3TextConfig(
        **{
            **COMMON,
            "head_dim": 32,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            **kw,
        }
    ),
}


def make_tiny_model(
    root: Path, family: str, seed: int = 0, tokenizer_from: Path | None = None, **overrides
) -> Path:
    """A random model; with `tokenizer_from`, it gets that tokenizer (and its vocab size), so
    it can serve text through the gateway."""
    path = root / f"tiny-{family}-{seed}{'-tok' if tokenizer_from else ''}"
    if (path / "config.json").exists():
        return path
    if tokenizer_from is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
        overrides = {
            "vocab_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
            **overrides,
        }
    config = FAMILIES[family](**overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    if tokenizer_from is not None:
        tokenizer.save_pretrained(path)
    return path


def gguf_of(converter: Path, model: Path, out: Path, outtype: str = "f32") -> Path:
    """The model as llama.cpp's converter writes it (f32: the weights exactly; q8_0: its 8-bit
    blocks)."""
    argv = [sys.executable, converter, model, "--outtype", outtype, "--outfile", out]
    subprocess.run(argv, check=True, capture_output=True)
    return out
