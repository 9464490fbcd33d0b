"""Hugging Face architecture name -> ModelArgs for the one decoder in llama.py."""

import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from baton.model.llama import ModelArgs

# Hugging Face model_type -> flags that differ from Llama
SUPPORTED: dict[str, dict[str, bool]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {"attn_bias": True},
}


class UnsupportedModel(ValueError):
    pass


def _rope(config: PretrainedConfig, head_dim: int) -> tuple[list[float], float]:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        theta = params.get("rope_theta", 10000.0)
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        return inv.tolist(), 1.0
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
    return inv_freq.tolist(), float(scaling)


def model_args(config: PretrainedConfig) -> ModelArgs:
    arch = config.model_type
    if arch not in SUPPORTED:
        raise UnsupportedModel(
            f"unsupported architecture {arch!r} ({getattr(config, 'architectures', None)}); "
            f"Baton supports {', '.join(sorted(SUPPORTED))}"
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv_freq, attention_scaling = _rope(config, head_dim)
    max_position = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < max_position:
        # Without sliding-window attention, stay exact by never going past the window.
        max_position = window
    return ModelArgs(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        rms_norm_eps=config.rms_norm_eps,
        max_position=max_position,
        rope_inv_freq=tuple(float(f) for f in inv_freq),
        rope_attention_scaling=attention_scaling,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        **SUPPORTED[arch],
    )
