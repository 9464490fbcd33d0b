"""Llama, Mistral, Qwen2/3 (dense and MoE), Mixtral, Phi-3 and Gemma 2/3 in one decoder,
differing only by flags in ModelArgs.

The forward runs over a flat batch of tokens from many sequences ([T, hidden]); attention reads
and writes the paged KV cache through AttentionMetadata. q/k/v and gate/up are fused into one
matmul each; `packed_modules` tells the loader how Hugging Face names map onto them.
"""

import logging
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from baton import kernels
from baton.model.attention import AttentionMetadata, PagedAttention
from baton.model.linear import FusedLinear, Linear
from baton.model.moe import Experts, SparseMoE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position: int
    rope_inv_freq: tuple[float, ...]  # from transformers' rope init, whatever the rope type
    rope_attention_scaling: float = 1.0
    attn_bias: bool = False  # Qwen2: q/k/v projections carry biases
    qk_norm: bool = False  # Qwen3: each head of q and k RMS-normed before rotary
    # sparse MoE MLPs (Qwen3-MoE, Mixtral): top-k of num_experts, each moe_intermediate_size
    # wide; norm_topk renormalizes the top-k weights to sum to 1; dense_layers keep an MLP
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk: bool = True
    dense_layers: tuple[int, ...] = ()
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"  # the MLP's gate: silu, or gelu_pytorch_tanh (Gemma's GeGLU)
    # attention over the last `sliding_window` positions only, in these layers (Gemma's
    # interleaved local layers, Mistral's every layer); Gemma 3 rotates them by their own
    # frequencies (local_rope_inv_freq; empty: rope_inv_freq)
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()
    local_rope_inv_freq: tuple[float, ...] = ()
    # Gemma 2/3: norms before and after both the attention and the MLP, each scaling by
    # (1 + weight) (folded into the weight at load), embeddings times sqrt(hidden_size)
    sandwich_norms: bool = False
    attn_scale: float | None = None  # query_pre_attn_scalar ** -0.5; None: head_dim ** -0.5
    # Gemma 2: scores and logits soft-capped, cap * tanh(x / cap)
    attn_softcap: float | None = None
    logit_softcap: float | None = None
    # "int8": every projection's weight int8 in Q8_0 blocks (Linear.quantize);
    # part of the KV layout's fingerprint, so a quantized service and another never share KV
    quantization: str | None = None


class RMSNorm(nn.Module):
    """RMSNorm of x + residual; returns it and the sum, which is the next residual."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return kernels.add_rms_norm(x, residual, self.weight, self.eps)


class Norm(nn.Module):
    """RMSNorm of x alone, over its last dim (Qwen3's q and k per head; Gemma's norms after
    the attention and the MLP), computed as transformers does: in fp32, rounded back, then
    scaled."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Rotary(nn.Module):
    """cos/sin tables over all positions, built by `init_tables` once weights are in place."""

    def __init__(self, args: ModelArgs, inv_freq: tuple[float, ...]):
        super().__init__()
        self.args, self.inv_freq = args, inv_freq
        self.cos = self.sin = torch.empty(0)

    def init_tables(self, dtype: torch.dtype) -> None:
        inv_freq = torch.tensor(self.inv_freq, dtype=torch.float32)
        freqs = torch.outer(torch.arange(self.args.max_position, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = self.args.rope_attention_scaling
        self.cos = (emb.cos() * scale).to(dtype)
        self.sin = (emb.sin() * scale).to(dtype)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return kernels.apply_rotary(q, k, positions, self.cos, self.sin)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, rotary: Rotary, sliding: bool):
        super().__init__()
        self.q_size = args.num_heads * args.head_dim
        self.kv_size = args.num_kv_heads * args.head_dim
        self.head_dim = args.head_dim
        self.qkv_proj = FusedLinear(
            args.hidden_size, [self.q_size, self.kv_size, self.kv_size], bias=args.attn_bias
        )
        self.o_proj = Linear(self.q_size, args.hidden_size, bias=False)
        self.rotary = rotary
        self.attn = PagedAttention(
            args.num_heads,
            args.num_kv_heads,
            args.head_dim,
            scale=args.attn_scale or args.head_dim**-0.5,
            window=args.sliding_window if sliding else None,
            softcap=args.attn_softcap,
        )
        # None where the family has none (hasattr on a module raises and catches per call)
        self.q_norm = Norm(args.head_dim, args.rms_norm_eps) if args.qk_norm else None
        self.k_norm = Norm(args.head_dim, args.rms_norm_eps) if args.qk_norm else None

    def forward(self, x, positions, kv, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        unflat = (-1, self.head_dim)
        q, k = q.unflatten(-1, unflat), k.unflatten(-1, unflat)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(q, k, positions)
        o = self.attn(q, k, v.unflatten(-1, unflat), kv, meta)
        return self.o_proj(o.flatten(1))


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_up_proj = FusedLinear(args.hidden_size, [args.intermediate_size] * 2, False)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.act = ACTIVATIONS[args.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, rotary: Rotary, index: int):
        super().__init__()
        self.self_attn = Attention(args, rotary, sliding=index in args.sliding_layers)
        sparse = args.num_experts > 0 and index not in args.dense_layers
        self.mlp = SparseMoE(args) if sparse else MLP(args)
        hidden, eps = args.hidden_size, args.rms_norm_eps
        self.input_layernorm = RMSNorm(hidden, eps)
        self.sandwich = args.sandwich_norms
        if self.sandwich:  # Gemma's names: post_attention_layernorm is the attention's own
            self.post_attention_layernorm: nn.Module = Norm(hidden, eps)
            self.pre_feedforward_layernorm = RMSNorm(hidden, eps)
            self.post_feedforward_layernorm = Norm(hidden, eps)
        else:
            self.post_attention_layernorm = RMSNorm(hidden, eps)

    def forward(self, x, residual, positions, kv, meta: AttentionMetadata):
        # the residual stream is carried apart from x so that each norm fuses the add before it
        x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, kv, meta)
        if self.sandwich:
            x, residual = self.pre_feedforward_layernorm(self.post_attention_layernorm(x), residual)
            return self.post_feedforward_layernorm(self.mlp(x)), residual
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class CausalLM(nn.Module):
    # Hugging Face projection name -> (fused module name, shard index)
    packed_modules: ClassVar[dict[str, tuple[str, int]]] = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.rotary = Rotary(args, args.rope_inv_freq)
        local = Rotary(args, args.local_rope_inv_freq) if args.local_rope_inv_freq else None
        self.local_rotary = local
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(args, local if local and i in args.sliding_layers else self.rotary, i)
            for i in range(args.num_layers)
        )
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        self.tie_weights()

    def int8_modules(self) -> dict[str, Linear | Experts]:
        """What `--quantization int8` makes int8 (nothing without it), by the name of each
        weight in named_parameters() (a tied lm_head's is the embedding's; an Experts has two):
        every projection but MoE routers, whose few columns cost nothing to read and whose 8
        bits could change which experts a token goes to."""
        if self.args.quantization != "int8":
            return {}
        names = {id(p): n for n, p in self.named_parameters()}
        routers = {id(m.gate) for m in self.modules() if isinstance(m, SparseMoE)}
        found: dict[str, Linear | Experts] = {}
        for m in self.modules():
            if isinstance(m, Linear) and id(m) not in routers:
                found[names[id(m.weight)]] = m
            elif isinstance(m, Experts):
                found |= {names[id(m.gate_up_proj)]: m, names[id(m.down_proj)]: m}
        return found

    def prepack(self, int8_blocks: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
        """Quantize every projection (args.quantization; `int8_blocks` holds the loader's
        quantization of each weight by name, int8_modules, and is emptied), or prepack every
        bf16 one for a faster matmul on a CPU (see Linear)."""
        w = self.lm_head.weight
        if self.args.quantization == "int8":
            names: dict[int, tuple[Linear | Experts, list[str]]] = {}
            for name, m in self.int8_modules().items():
                names.setdefault(id(m), (m, []))[1].append(name)
            blocks = int8_blocks if int8_blocks is not None else {}
            for m, its in names.values():  # each module's blocks let go once it has packed them
                m.quantize(*(blocks.pop(name, None) for name in its))
            if not all(
                m.native for m in self.modules() if isinstance(m, Linear) and m.scale is not None
            ):
                log.warning(
                    "int8 weights run on torch here (the C kernel needs AVX-512 VNNI and BF16, "
                    "and bf16): slower than unquantized weights"
                )
        elif w.dtype == torch.bfloat16 and w.device.type == "cpu":
            for m in self.modules():
                if isinstance(m, Linear):
                    m.prepack()

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def loaded(self) -> None:
        """Once the checkpoint's weights are in: rotary tables in the weights' dtype, and
        Gemma's (1 + weight) norms folded into their weights."""
        for rotary in (self.rotary, self.local_rotary):
            if rotary is not None:
                rotary.init_tables(self.lm_head.weight.dtype)
        if self.args.sandwich_norms:
            with torch.no_grad():
                for m in self.modules():
                    if isinstance(m, RMSNorm | Norm):
                        m.weight.add_(1)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_layers: list[tuple[torch.Tensor, ...]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.args.sandwich_norms:  # sqrt(hidden_size) in the model's dtype, as Gemma has it
            x = x * torch.tensor(self.args.hidden_size**0.5, dtype=x.dtype)
        residual = torch.zeros_like(x)  # the first norm's add is then exact and a no-op
        for layer, kv in zip(self.layers, kv_layers, strict=True):
            x, residual = layer(x, residual, positions, kv, meta)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if (cap := self.args.logit_softcap) is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()
