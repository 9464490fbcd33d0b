"""Scatter new keys and values into the paged cache in C (kernels/csrc/kv_write.c), the same
writes as kernels/kv_write.py in one call for K and V."""

import torch

from baton.kernels import kv_int8, native


def write_kv(
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim] (a strided view)
    v_cache: torch.Tensor,
    k: torch.Tensor,  # [T, kv_heads, head_dim]
    v: torch.Tensor,
    slot_blocks: torch.Tensor,  # [T] block id of each new token
    slot_offsets: torch.Tensor,  # [T] its offset inside the block
) -> None:
    lib = native.load()
    assert lib is not None, "kernels.use() binds this op only where the library built"
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    row = kv_heads * head_dim
    assert v_cache.stride() == k_cache.stride() and k_cache.stride()[1:] == (row, head_dim, 1)
    # each token's row one contiguous run (tokens may be strided, as a qkv split leaves them)
    k, v = (x if x.stride()[1:] == (head_dim, 1) else x.contiguous() for x in (k, v))
    assert k.shape[1:] == v.shape[1:] == (kv_heads, head_dim)
    assert k.dtype == v.dtype == k_cache.dtype == v_cache.dtype
    blocks, offsets = slot_blocks.contiguous(), slot_offsets.contiguous()
    assert blocks.dtype == offsets.dtype == torch.int64 and len(blocks) == len(offsets) == len(k)
    size = k.element_size()
    status = lib.write_kv(
        k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0) * size, num_blocks, block_size,
        k.data_ptr(), k.stride(0) * size, v.data_ptr(), v.stride(0) * size, row * size,
        blocks.data_ptr(), offsets.data_ptr(), len(k),
    )  # fmt: skip
    if status:
        raise IndexError(f"a slot outside the pool of {num_blocks} blocks of {block_size}")


def write_kv_int8(
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim] int8
    v_cache: torch.Tensor,
    k_scale: torch.Tensor,  # [num_blocks, block_size, kv_heads] fp32
    v_scale: torch.Tensor,
    k: torch.Tensor,  # [T, kv_heads, head_dim]
    v: torch.Tensor,
    slot_blocks: torch.Tensor,
    slot_offsets: torch.Tensor,
) -> None:
    """kv_int8.write_kv_int8 for bf16 keys and values: quantized and written in one C call
    (fp32 ones take the torch op)."""
    if k.dtype != torch.bfloat16:
        kv_int8.write_kv_int8(k_cache, v_cache, k_scale, v_scale, k, v, slot_blocks, slot_offsets)
        return
    lib = native.load()
    assert lib is not None, "kernels.use() binds this op only where the library built"
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    assert k_cache.stride()[1:] == (kv_heads * head_dim, head_dim, 1)
    assert v_cache.stride() == k_cache.stride() and v_scale.stride() == k_scale.stride()
    assert k_scale.stride()[1:] == (kv_heads, 1)
    k, v = (x if x.stride()[1:] == (head_dim, 1) else x.contiguous() for x in (k, v))
    assert k.shape[1:] == v.shape[1:] == (kv_heads, head_dim) and v.dtype == torch.bfloat16
    blocks, offsets = slot_blocks.contiguous(), slot_offsets.contiguous()
    assert blocks.dtype == offsets.dtype == torch.int64 and len(blocks) == len(offsets) == len(k)
    status = lib.write_kv_i8_bf16(
        k_cache.data_ptr(), v_cache.data_ptr(), k_scale.data_ptr(), v_scale.data_ptr(),
        k_cache.stride(0), k_scale.stride(0), num_blocks, block_size, k.data_ptr(), k.stride(0),
        v.data_ptr(), v.stride(0), kv_heads, head_dim, blocks.data_ptr(), offsets.data_ptr(),
        len(k),
    )  # fmt: skip
    if status:
        raise IndexError(f"a slot outside the pool of {num_blocks} blocks of {block_size}")
