"""The sparse MoE block (Qwen3-MoE, Mixtral): a router's top-k experts per token, the experts
run grouped (tokens sorted by expert, one matmul per active expert)."""

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from baton.model.linear import Linear, linear_of

if TYPE_CHECKING:
    from baton.model.llama import ModelArgs


class Experts(nn.Module):
    """Every expert's MLP as one 3D weight each (transformers' layout: gate and up stacked)."""

    def __init__(self, args: "ModelArgs"):
        super().__init__()
        n, width, hidden = args.num_experts, args.moe_intermediate_size, args.hidden_size
        self.num_experts = n
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * width, hidden))
        self.down_proj = nn.Parameter(torch.empty(n, hidden, width))
        self.int8: nn.ModuleList | None = None  # (gate_up, down) per expert, once quantized

    def quantize(self, *blocks: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """int8 weights (`--quantization int8`): each expert's two projections become Linear
        modules quantized as every other projection is (Linear.quantize; `blocks`: the
        loader's int8 blocks of gate_up_proj and down_proj, each [experts, ...], or None);
        the 3D weights go."""
        blocks = blocks or (None, None)
        pairs = []
        for e, weights in enumerate(zip(self.gate_up_proj, self.down_proj, strict=True)):
            pair = nn.ModuleList(linear_of(w) for w in weights)
            for m, qd in zip(pair, blocks, strict=True):
                m.quantize(None if qd is None else (qd[0][e], qd[1][e]))
            pairs.append(pair)
        self.int8 = nn.ModuleList(pairs)
        self.register_parameter("gate_up_proj", None)
        self.register_parameter("down_proj", None)

    def project(self, expert: int, which: int, x: torch.Tensor) -> torch.Tensor:
        """x through an expert's gate_up (which 0) or down (1) projection."""
        if self.int8 is not None:
            return self.int8[expert][which](x)
        return F.linear(x, (self.gate_up_proj, self.down_proj)[which][expert])

    def forward(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, hidden]; chosen and weights [T, k]. The T x k rows are sorted by expert, and
        each expert that any token chose runs once over its rows: a loop over experts, not
        tokens. Each token's outputs are summed in expert order, as transformers sums them."""
        k = chosen.shape[1]
        order = torch.argsort(chosen.flatten(), stable=True)
        counts = torch.bincount(chosen.flatten(), minlength=self.num_experts).tolist()
        tokens, row_weights = order // k, weights.flatten()[order].unsqueeze(1)
        out = torch.zeros_like(x)
        start = 0
        for expert, n in enumerate(counts):
            if n == 0:
                continue
            rows = slice(start, start + n)
            gate, up = self.project(expert, 0, x[tokens[rows]]).chunk(2, dim=-1)
            y = self.project(expert, 1, F.silu(gate) * up) * row_weights[rows]
            out.index_add_(0, tokens[rows], y.to(out.dtype))
            start += n
        return out


class SparseMoE(nn.Module):
    """A router picks each token's top-k experts from a softmax over all of them (in fp32);
    their weights renormalized to sum to 1 where the family does."""

    def __init__(self, args: "ModelArgs"):
        super().__init__()
        self.gate = Linear(args.hidden_size, args.num_experts, bias=False)
        self.experts = Experts(args)
        self.k, self.norm_topk = args.experts_per_token, args.norm_topk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return self.experts(x, chosen, weights.to(x.dtype))
