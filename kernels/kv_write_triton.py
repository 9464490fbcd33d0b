"""Scatter new keys and values into the paged cache in Triton; kernels/kv_write.py is the
reference. One program per token copies its [kv_heads, head_dim] rows of K and V."""

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    k_cache, v_cache, k, v, slot_blocks, slot_offsets,
    stride_cb, stride_ct, stride_ch,
    stride_kt, stride_kh, stride_vt, stride_vh,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < KV_HEADS) & (d < HEAD_DIM)
    # int64: the block stride spans every layer, so block * stride overflows int32 in big pools
    slot = tl.load(slot_blocks + token).to(tl.int64) * stride_cb
    slot += tl.load(slot_offsets + token) * stride_ct
    dst = slot + h * stride_ch + d
    k_row = tl.load(k + token * stride_kt + h * stride_kh + d, mask=mask)
    v_row = tl.load(v + token * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(k_cache + dst, k_row, mask=mask)
    tl.store(v_cache + dst, v_row, mask=mask)


def write_kv(
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim], any block stride
    v_cache: torch.Tensor,
    k: torch.Tensor,  # [T, kv_heads, head_dim]
    v: torch.Tensor,
    slot_blocks: torch.Tensor,  # [T]
    slot_offsets: torch.Tensor,  # [T]
) -> None:
    num_tokens, kv_heads, head_dim = k.shape
    assert k_cache.stride() == v_cache.stride() and k_cache.shape[2:] == k.shape[1:]
    assert k_cache.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    _write_kv_kernel[(num_tokens,)](
        k_cache, v_cache, k, v, slot_blocks, slot_offsets,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        KV_HEADS=kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )  # fmt: skip
