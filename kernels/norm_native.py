"""RMSNorm fused with the residual add, in C for a bf16 CPU engine (kernels/csrc/norm.c);
kernels/norm.py is the reference. fp32 stays on the reference: its sum of squares in torch's
own order keeps fp32 logits bit for bit those of transformers, which the tests compare."""

import torch

from baton.kernels import native, norm


def add_rms_norm(
    x: torch.Tensor,  # [T, hidden]
    residual: torch.Tensor,  # [T, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (RMSNorm(x + residual), x + residual): the sum is the next layer's residual."""
    if x.dtype != torch.bfloat16:
        return norm.add_rms_norm(x, residual, weight, eps)
    lib = native.load()
    assert lib is not None, "kernels.use() binds this op only where the library built"
    x, residual, weight = x.contiguous(), residual.contiguous(), weight.contiguous()
    assert residual.shape == x.shape and weight.shape == x.shape[-1:], "no broadcasting here"
    assert residual.dtype == weight.dtype == x.dtype
    out, total = torch.empty_like(x), torch.empty_like(x)
    rows, hidden = x.shape
    lib.add_rms_norm_bf16(
        x.data_ptr(), residual.data_ptr(), weight.data_ptr(), rows, hidden, eps,
        out.data_ptr(), total.data_ptr(),
    )  # fmt: skip
    return out, total
