"""Rotary embedding of q and k in one Triton launch; kernels/rotary.py is the reference. One
program per token rotates all its query and key heads with the cos/sin row of its position."""

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x, out, stride_x, stride_o, cos1, cos2, sin1, sin2,
                  NUM_HEADS: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):  # fmt: skip
    """out = x * cos + rotate_half(x) * sin for one token's heads, where rotate_half(x) is
    (-x2, x1) for the halves x1, x2 of each head."""
    h = tl.arange(0, BLOCK_H)[:, None]
    i = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < NUM_HEADS) & (i < HALF)
    x1 = tl.load(x + h * stride_x + i, mask=mask, other=0.0)
    x2 = tl.load(x + h * stride_x + HALF + i, mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(out + h * stride_o + i, x1f * cos1 - x2f * sin1, mask=mask)
    tl.store(out + h * stride_o + HALF + i, x2f * cos2 + x1f * sin2, mask=mask)


@triton.jit
def _rotary_kernel(
    q, k, positions, cos, sin, q_out, k_out,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_table,
    Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    i = tl.arange(0, BLOCK_HALF)[None, :]
    mask = i < HALF
    table_row = tl.load(positions + token) * stride_table + i
    # each half has its own cos/sin row, so any table the reference accepts works here too
    cos1 = tl.load(cos + table_row, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos + table_row + HALF, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin + table_row, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin + table_row + HALF, mask=mask, other=0.0).to(tl.float32)
    _rotate_heads(q + token * stride_qt, q_out + token * stride_qot, stride_qh, stride_qoh,
                  cos1, cos2, sin1, sin2, Q_HEADS, HALF, BLOCK_QH, BLOCK_HALF)  # fmt: skip
    _rotate_heads(k + token * stride_kt, k_out + token * stride_kot, stride_kh, stride_koh,
                  cos1, cos2, sin1, sin2, KV_HEADS, HALF, BLOCK_KH, BLOCK_HALF)  # fmt: skip


def apply_rotary(
    q: torch.Tensor,  # [T, q_heads, head_dim]
    k: torch.Tensor,  # [T, kv_heads, head_dim]
    positions: torch.Tensor,  # [T]
    cos: torch.Tensor,  # [max_position, head_dim]
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    assert head_dim % 2 == 0 and cos.shape == sin.shape and cos.stride() == sin.stride()
    assert q.stride(-1) == k.stride(-1) == cos.stride(-1) == 1
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos, sin, q_out, k_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        cos.stride(0),
        Q_HEADS=q_heads, KV_HEADS=kv_heads, HALF=half,
        BLOCK_QH=triton.next_power_of_2(q_heads), BLOCK_KH=triton.next_power_of_2(kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half),
    )  # fmt: skip
    return q_out, k_out
