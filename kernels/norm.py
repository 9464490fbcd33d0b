"""RMSNorm fused with the residual add before it, torch reference (Triton: norm_triton.py).

Computed as transformers does (the sum rounded to the model dtype, the norm in fp32, the weight
applied in the model dtype), so bf16 results match it bit for bit.
"""

import torch


def add_rms_norm(
    x: torch.Tensor,  # [T, hidden]
    residual: torch.Tensor,  # [T, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (RMSNorm(x + residual), x + residual): the sum is the next layer's residual."""
    h = x + residual
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(h.dtype), h
