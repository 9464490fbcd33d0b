"""Convert and load model weights (baton.model.files finds them, without torch).

A GGUF is dequantized once through transformers + gguf and cached as a Hugging Face
directory keyed by the file's hash, so later starts take about a second. The model is built on
the meta device, materialized empty, and the tensors are streamed in one at a time.
"""

import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from baton import kernels
from baton.kernels.linear_native import empty_int8, quantize_int8
from baton.model.linear import FusedLinear
from baton.model.llama import CausalLM
from baton.model.registry import UnsupportedModel, model_args

log = logging.getLogger(__name__)


def convert_gguf(path: Path, out: Path) -> Path:
    """Dequantize `path` into the Hugging Face directory `out` (baton.model.files)."""
    from transformers import AutoModelForCausalLM

    log.info("converting %s to %s (once)", path, out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    kw = {"gguf_file": path.name}
    config = gguf_config(path)
    hf, info = AutoModelForCausalLM.from_pretrained(
        path.parent,
        config=config,
        dtype=torch.float32,
        output_loading_info=True,
        ignore_mismatched_sizes=True,  # reported below, by name
        **kw,
    )
    # transformers builds what the config names and fills what it can map; the rest would be
    # served as random weights (a Mixtral GGUF is read as a dense Llama): refused instead
    unread = sorted({*info["missing_keys"], *(k for k, *_ in info["mismatched_keys"])})
    if unread:
        raise UnsupportedModel(
            f"{path.name}: transformers' GGUF reader ({config.model_type}) leaves "
            f"{len(unread)} weights unset ({', '.join(unread[:4])}, ...); convert the "
            "Hugging Face checkpoint instead"
        )
    AutoTokenizer.from_pretrained(path.parent, **kw).save_pretrained(tmp)
    state = hf.state_dict()
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors")
    # a GGUF-loaded model refuses save_pretrained; the dequantized weights are plain tensors
    config = hf.config
    config.architectures = [type(hf).__name__]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    if out.exists():  # another process converted it meanwhile
        shutil.rmtree(tmp)
    else:
        tmp.rename(out)
    return out


# GGUF keys (after "<arch>.") that transformers' reader leaves at its family's defaults (Qwen3's
# head size 128 whatever `key_length` says, Gemma 2's soft-caps 50 and 30), and the config
# fields they set.
GGUF_FIELDS = {
    "attention.key_length": "head_dim",
    "expert_feed_forward_length": "moe_intermediate_size",
    "attn_logit_softcapping": "attn_logit_softcapping",
    "final_logit_softcapping": "final_logit_softcapping",
}


def gguf_config(path: Path) -> PretrainedConfig:
    """The config transformers reads from a GGUF, with what the file states (GGUF_FIELDS)."""
    from gguf import GGUFReader

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    reader = GGUFReader(path)
    fields = reader.fields
    arch = bytes(fields["general.architecture"].parts[-1]).decode()
    for key, attr in GGUF_FIELDS.items():
        if (field := fields.get(f"{arch}.{key}")) is not None and hasattr(config, attr):
            setattr(config, attr, field.parts[-1][0].item())
    if arch in GEMMA_27B_LAYERS:
        wide = config.num_hidden_layers == GEMMA_27B_LAYERS[arch]
        per_head = config.hidden_size // config.num_attention_heads
        config.query_pre_attn_scalar = per_head if wide else config.head_dim
    factors = {t.name: t.data.tolist() for t in reader.tensors if t.name in LONGROPE_FACTORS}
    if factors:  # Phi-3's longrope, which transformers' reader drops (plain rope served)
        original = int(fields[f"{arch}.rope.scaling.original_context_length"].parts[-1][0])
        config.original_max_position_embeddings = original
        config.rope_parameters = {
            **config.rope_parameters, "rope_type": "longrope",
            **{name: factors[tensor] for tensor, name in LONGROPE_FACTORS.items()},
            "original_max_position_embeddings": original,
        }  # fmt: skip
    return config


# the tensors llama.cpp's converter writes a longrope model's factors to
LONGROPE_FACTORS = {
    "rope_factors_short.weight": "short_factor",
    "rope_factors_long.weight": "long_factor",
}


# Gemma's query_pre_attn_scalar is not in a GGUF (transformers' reader leaves 256): it is the
# head size, but hidden_size / heads in the 27B models, which llama.cpp tells by their layer
# count (src/models/gemma2.cpp, gemma3.cpp); so is it told here
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


# one expert's projection as checkpoints store it (Qwen3-MoE's names, Mixtral's w1/w3/w2)
EXPERT = re.compile(r"(.+\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight")
# -> (the experts' 3D weight, which half of gate_up_proj or None)
EXPERT_SHARDS = {
    "gate_proj": ("gate_up_proj", 0),
    "w1": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "w3": ("gate_up_proj", 1),
    "down_proj": ("down_proj", None),
    "w2": ("down_proj", None),
}


def _target(model: CausalLM, name: str) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The parameter a checkpoint tensor fills, and the view of it that it fills (of the
    parameter, or of anything shaped as it over the last dimension, as its int8 blocks): a
    shard of a fused projection, one expert of the experts' 3D weights, or the whole."""
    if expert := EXPERT.fullmatch(name):
        experts, index, proj = expert.groups()
        fused, half = EXPERT_SHARDS[proj]

        def expert_view(t: torch.Tensor) -> torch.Tensor:
            t = t[int(index)]
            return t if half is None else t.narrow(0, half * (len(t) // 2), len(t) // 2)

        return f"{experts}.{fused}", expert_view
    *prefix, proj, kind = name.split(".")
    if proj in CausalLM.packed_modules:
        fused, shard = CausalLM.packed_modules[proj]
        module = model.get_submodule(".".join([*prefix, fused]))
        assert isinstance(module, FusedLinear)
        offset = sum(module.sizes[:shard])
        return ".".join([*prefix, fused, kind]), lambda t: t.narrow(0, offset, module.sizes[shard])
    return name, lambda t: t


def load_hf_config(model_dir: Path) -> PretrainedConfig:
    return AutoConfig.from_pretrained(model_dir)


def load_model(model_dir: Path, dtype: torch.dtype, quantization: str | None = None) -> CausalLM:
    """The model with its weights, its projections quantized as asked (ModelArgs.quantization).
    The kernels are bound first (kernels.bind_default): the projections pack their weights for
    the backend."""
    kernels.bind_default()
    args = replace(model_args(load_hf_config(model_dir)), quantization=quantization)
    with torch.device("meta"):
        model = CausalLM(args).to(dtype)
    model.to_empty(device="cpu")
    model.tie_weights()
    params = dict(model.named_parameters())
    loaded = dict.fromkeys(params, 0)  # elements written per parameter
    # int8 weights are quantized from the checkpoint's own tensors, before their cast to
    # dtype: a Q8_0 GGUF's (dequantized exactly into fp32) come back as its blocks. Their
    # dtype copies are never written (nor their pages touched) but where something else reads
    # them (a tied lm_head's embedding)
    int8_modules = model.int8_modules()
    int8 = {name: empty_int8(params[name]) for name in int8_modules}
    int8_only = {
        name for name, m in int8_modules.items()
        if model.get_submodule(name.rpartition(".")[0]) is m
    }  # fmt: skip
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    for file in files:
        with safe_open(file, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                name = key.removeprefix("model.")
                if "rotary_emb" in name or (args.tie_word_embeddings and name == "lm_head.weight"):
                    continue
                tensor = f.get_tensor(key)
                name = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's MoE block
                try:
                    name, view = _target(model, name)
                    target = view(params[name])
                except (KeyError, AttributeError):
                    raise KeyError(f"{file.name}: unexpected weight {key!r}") from None
                if target.shape != tensor.shape:
                    raise ValueError(
                        f"{key}: shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
                    )
                with torch.no_grad():
                    if name not in int8_only:
                        target.copy_(tensor)
                    if name in int8:
                        for buffer, part in zip(int8[name], quantize_int8(tensor), strict=True):
                            view(buffer).copy_(part)
                loaded[name] += tensor.numel()
    missing = [n for n, p in params.items() if loaded[n] != p.numel()]
    if missing:
        raise ValueError(f"weights missing from {model_dir}: {missing[:8]}")
    model.loaded()
    model.requires_grad_(False).prepack(int8)
    return model.eval()


def load_tokenizer(model_dir: Path):
    """The model's tokenizer, or None for a weights-only directory (token-id prompts only)."""
    has_tokenizer = any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer.model"))
    return AutoTokenizer.from_pretrained(model_dir) if has_tokenizer else None


def eos_token_ids(model_dir: Path, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    sources = [load_hf_config(model_dir)]
    if (model_dir / "generation_config.json").is_file():
        from transformers import GenerationConfig

        sources.append(GenerationConfig.from_pretrained(model_dir))
    for src in sources:
        eos = getattr(src, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else eos or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
