"""Tiny random-weight Llama / Qwen2 / Mistral models saved as Hugging Face directories."""

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

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
