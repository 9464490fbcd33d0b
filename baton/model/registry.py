"""Hugging Face architecture name -> ModelArgs for the one decoder in llama.py."""

import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from baton.model.llama import ACTIVATIONS, ModelArgs

# Hugging Face model_type -> flags that differ from Llama. Phi-3's fused qkv_proj and
# gate_up_proj are the decoder's own fused layout, so they load as they are.
SUPPORTED: dict[str, dict[str, bool]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {"attn_bias": True},
    "qwen3": {"qk_norm": True},
    "qwen3_moe": {"qk_norm": True},
    "mixtral": {},
    "phi3": {},
    "gemma2": {"sandwich_norms": True},
    "gemma3_text": {"sandwich_norms": True, "qk_norm": True},
}


class UnsupportedModel(ValueError):
    pass


def _rope(
    config: PretrainedConfig, head_dim: int, layer_type: str | None = None
) -> tuple[list[float], float]:
    """Rotary frequencies and attention scaling; per layer type where the config keeps
    parameters per type (Gemma 3: its sliding layers have their own)."""
    layer_type, params = _rope_params(config, layer_type)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        theta = params.get("rope_theta", 10000.0)
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        return inv.tolist(), 1.0
    kwargs = {"layer_type": layer_type} if layer_type else {}
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, **kwargs)
    return inv_freq.tolist(), float(scaling)


def _rope_params(
    config: PretrainedConfig, layer_type: str | None = None
) -> tuple[str | None, dict]:
    """The config's rope parameters, and the layer type they are kept under: `layer_type`'s
    or, where the config keeps them per type, the global layers' (full_attention); None as
    the type where it keeps one set."""
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" not in params:
        return None, params
    layer_type = layer_type or "full_attention"
    return layer_type, params.get(layer_type) or {}


def _sliding(config: PretrainedConfig, head_dim: int) -> dict:
    """ModelArgs' sliding-window fields: the layers `layer_types` names sliding, or every layer
    where the config sets a window and names no types (Mistral, Mixtral, Phi-3)."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return {}
    types = getattr(config, "layer_types", None)
    layers = range(config.num_hidden_layers)
    sliding = tuple(i for i in layers if types is None or types[i] == "sliding_attention")
    if not sliding:
        return {}
    fields: dict = {"sliding_window": window, "sliding_layers": sliding}
    if "sliding_attention" in (getattr(config, "rope_parameters", None) or {}):
        local, scaling = _rope(config, head_dim, "sliding_attention")
        if scaling != 1.0:
            raise UnsupportedModel("rope scaling on sliding-window layers is not supported")
        fields["local_rope_inv_freq"] = tuple(local)
    return fields


def _moe(config: PretrainedConfig) -> dict:
    """ModelArgs' MoE fields for Qwen3-MoE (num_experts; dense MLPs in mlp_only_layers and
    off the decoder_sparse_step) or Mixtral (num_local_experts); none for a dense model."""
    n = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if not n:
        return {}
    step = getattr(config, "decoder_sparse_step", None) or 1
    only = set(getattr(config, "mlp_only_layers", None) or ())
    layers = range(config.num_hidden_layers)
    return {
        "num_experts": n,
        "experts_per_token": config.num_experts_per_tok,
        "moe_intermediate_size": getattr(config, "moe_intermediate_size", None)
        or config.intermediate_size,
        "norm_topk": bool(getattr(config, "norm_topk_prob", True)),
        "dense_layers": tuple(i for i in layers if i in only or (i + 1) % step),
    }


def model_args(config: PretrainedConfig) -> ModelArgs:
    arch = config.model_type
    if arch not in SUPPORTED:
        raise UnsupportedModel(
            f"unsupported architecture {arch!r} ({getattr(config, 'architectures', None)}); "
            f"Baton supports {', '.join(sorted(SUPPORTED))}"
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    _, rope = _rope_params(config)
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModel(
            f"{arch}: rotary over part of each head (partial_rotary_factor "
            f"{rope['partial_rotary_factor']}) is not supported"
        )
    inv_freq, attention_scaling = _rope(config, head_dim)
    max_position = config.max_position_embeddings
    if rope.get("rope_type") == "longrope":
        # Phi-3: transformers turns to the long factors once a sequence passes the original
        # length, leaving the keys cached before rotated by the short ones; serve below it
        original = rope.get("original_max_position_embeddings") or getattr(
            config, "original_max_position_embeddings", max_position
        )
        max_position = min(max_position, original)
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise UnsupportedModel(f"{arch}: activation {act!r} is not supported")
    pre_attn = getattr(config, "query_pre_attn_scalar", None)
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
        hidden_act=act,
        attn_scale=pre_attn**-0.5 if pre_attn else None,
        attn_softcap=getattr(config, "attn_logit_softcapping", None),
        logit_softcap=getattr(config, "final_logit_softcapping", None),
        **{"attn_bias": bool(getattr(config, "attention_bias", False)), **SUPPORTED[arch]},
        **_moe(config),
        **_sliding(config, head_dim),
    )
