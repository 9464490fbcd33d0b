"""Paged decode attention in C for the CPU (kernels/csrc/paged_decode.c); the torch op in
paged_attention.py is its reference. Each sequence reads only its own blocks, where the
torch op pads every sequence to the longest one's table: with one 3k-token context in a
batch of 20 short ones, that padding made decode steps 5x slower."""

import torch

from kernels import native, paged_attention

_FUNCTIONS = {torch.bfloat16: "paged_decode_bf16", torch.float32: "paged_decode_f32"}


def paged_decode_attention(
    q: torch.Tensor,  # [B, q_heads, head_dim]: one new token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim], rows contiguous
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int64
    ctx_lens: torch.Tensor,  # [B] int64, the new token included
    scale: float,
) -> torch.Tensor:
    """One query per sequence over its whole cached context. Returns [B, q_heads, head_dim]."""
    lib = native.load()
    assert lib is not None, "kernels.use() binds this op only where the library built"
    b, q_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    # the kernel walks a block's rows as one range and the views share one block stride
    assert k_cache.stride()[1:] == (kv_heads * head_dim, head_dim, 1), "rows not contiguous"
    assert v_cache.stride() == k_cache.stride() and q.dtype == k_cache.dtype
    q = q.contiguous()
    tables, lens = block_tables.contiguous(), ctx_lens.contiguous()
    assert tables.dtype == lens.dtype == torch.int64
    out = torch.empty_like(q)
    rc = getattr(lib, _FUNCTIONS[q.dtype])(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0),
        tables.data_ptr(), tables.stride(0), lens.data_ptr(),
        b, q_heads, kv_heads, head_dim, block_size, scale, out.data_ptr(),
    )  # fmt: skip
    if rc != 0:  # head_dim over 256 (or no memory for its scratch): torch's turn
        return paged_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    return out
