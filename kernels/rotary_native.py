"""Rotary embedding in C for the CPU (kernels/csrc/rotary.c), bit for bit kernels/rotary.py:
one pass over q and k, reading them where the fused qkv projection left them."""

import torch

from baton.kernels import native

_FUNCTIONS = {torch.bfloat16: "apply_rotary_bf16", torch.float32: "apply_rotary_f32"}


def apply_rotary(
    q: torch.Tensor,  # [T, q_heads, head_dim], rows may be strided
    k: torch.Tensor,  # [T, kv_heads, head_dim]
    positions: torch.Tensor,  # [T]
    cos: torch.Tensor,  # [max_position, head_dim]: both halves hold the same frequencies
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns q and k rotated by the angle of each token's position, contiguous."""
    lib = native.load()
    assert lib is not None, "kernels.use() binds this op only where the library built"
    tokens, q_heads, head_dim = q.shape
    k_heads = k.shape[1]
    for x in (q, k):  # each token's heads one contiguous run, as a qkv split leaves them
        assert x.stride()[1:] == (head_dim, 1), "heads not contiguous within a token"
    assert k.dtype == cos.dtype == sin.dtype == q.dtype
    cos, sin, positions = cos.contiguous(), sin.contiguous(), positions.contiguous()
    assert positions.dtype == torch.int64
    q_out, k_out = (torch.empty(tokens, n, head_dim, dtype=q.dtype) for n in (q_heads, k_heads))
    getattr(lib, _FUNCTIONS[q.dtype])(
        q.data_ptr(), q.stride(0), q_heads, k.data_ptr(), k.stride(0), k_heads, head_dim,
        positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), tokens,
        q_out.data_ptr(), k_out.data_ptr(),
    )  # fmt: skip
    return q_out, k_out
