"""Scatter new keys and values into their slots of the paged cache, torch reference (Triton:
kv_write_triton.py)."""

import torch


def write_kv(
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim] (a strided view)
    v_cache: torch.Tensor,
    k: torch.Tensor,  # [T, kv_heads, head_dim]
    v: torch.Tensor,
    slot_blocks: torch.Tensor,  # [T] block id of each new token
    slot_offsets: torch.Tensor,  # [T] its offset inside the block
) -> None:
    k_cache[slot_blocks, slot_offsets] = k
    v_cache[slot_blocks, slot_offsets] = v
