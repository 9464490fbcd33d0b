"""Paged attention in C for the CPU (kernels/csrc/paged_decode.c, paged_extend.c); the torch
ops in paged_attention.py are their references.

Decode: each sequence reads only its own blocks, where the torch op pads every sequence to the
longest one's table: with one 3k-token context in a batch of 20 short ones, that padding made
decode steps 5x slower. Extend (prompts, bf16): scores stay in registers, where the torch op
writes the whole score matrix and runs a softmax over it, as costly as both its matmuls for a
prompt of a few thousand tokens (RESULTS.md, 2026-12-01)."""

import torch

from baton.kernels import kv_int8, native, paged_attention

_DECODE = {torch.bfloat16: "paged_decode_bf16", torch.float32: "paged_decode_f32"}


def _checked_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
    lib = native.load()
    assert lib is not None, "kernels.use() binds these ops only where the library built"
    _, block_size, kv_heads, head_dim = k_cache.shape
    # the kernels walk a block's rows as one range and the views share one block stride
    assert k_cache.stride()[1:] == (kv_heads * head_dim, head_dim, 1), "rows not contiguous"
    assert v_cache.stride() == k_cache.stride() and q.dtype == k_cache.dtype
    return lib, block_size, kv_heads


def paged_decode_attention(
    q: torch.Tensor,  # [B, q_heads, head_dim]: one new token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim], rows contiguous
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int64
    ctx_lens: torch.Tensor,  # [B] int64, the new token included
    scale: float,
    window: int | None = None,  # a sliding layer's: only the last `window` positions
    softcap: float | None = None,  # scores soft-capped before the softmax
) -> torch.Tensor:
    """One query per sequence over its cached context (or its window's part: only those
    blocks are read). Returns [B, q_heads, head_dim]."""
    lib, block_size, kv_heads = _checked_cache(q, k_cache, v_cache)
    b, q_heads, head_dim = q.shape
    q = q.contiguous()
    tables, lens = block_tables.contiguous(), ctx_lens.contiguous()
    assert tables.dtype == lens.dtype == torch.int64
    out = torch.empty_like(q)
    rc = getattr(lib, _DECODE[q.dtype])(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0),
        tables.data_ptr(), tables.stride(0), lens.data_ptr(),
        b, q_heads, kv_heads, head_dim, block_size, scale, window or 0, softcap or 0.0,
        out.data_ptr(),
    )  # fmt: skip
    if rc != 0:  # head_dim over 256 (or no memory for its scratch): torch's turn
        return paged_attention.paged_decode_attention(
            q, k_cache, v_cache, tables, lens, scale, window, softcap
        )
    return out


def extend_attention_varlen(
    q: torch.Tensor,  # [T, q_heads, head_dim]: new tokens of S sequences, packed
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks] int64
    cu_seqlens: torch.Tensor,  # [S + 1] int64
    ctx_lens: torch.Tensor,  # [S] int64, new tokens included (already written)
    max_num_new: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """New tokens attend causally to themselves and their cached prefix (a sliding layer's:
    its window of it). bf16 in C; fp32 (the dtype the tests hold to transformers token for
    token) stays on the torch op. Returns [T, q_heads, head_dim]."""
    args = (block_tables, cu_seqlens, ctx_lens, max_num_new, scale, window, softcap)
    if q.dtype != torch.bfloat16:
        return paged_attention.extend_attention_varlen(q, k_cache, v_cache, *args)
    lib, block_size, kv_heads = _checked_cache(q, k_cache, v_cache)
    _, q_heads, head_dim = q.shape
    q = q.contiguous()
    tables, cu, lens = block_tables.contiguous(), cu_seqlens.contiguous(), ctx_lens.contiguous()
    assert tables.dtype == cu.dtype == lens.dtype == torch.int64
    out = torch.empty_like(q)
    rc = lib.paged_extend_bf16(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0),
        tables.data_ptr(), tables.stride(0), cu.data_ptr(), lens.data_ptr(), len(lens),
        q_heads, kv_heads, head_dim, block_size, scale, window or 0, softcap or 0.0,
        out.data_ptr(),
    )  # fmt: skip
    if rc != 0:  # no AVX-512 BF16, head_dim not in 32s or over 256, no memory: torch's turn
        return paged_attention.extend_attention_varlen(q, k_cache, v_cache, *args)
    return out


def paged_decode_attention_int8(
    q: torch.Tensor,  # [B, q_heads, head_dim] bf16
    kv: tuple[torch.Tensor, ...],  # (K, V, K scales, V scales) of one layer, 8-bit
    block_tables: torch.Tensor,  # [B, max_blocks] int64
    ctx_lens: torch.Tensor,  # [B] int64, the new token included
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """paged_decode_attention over the 8-bit cache (csrc/paged_decode_i8.c); fp32 queries, or
    a CPU without AVX-512 VNNI, take the torch op (kv_int8.py)."""
    k_cache, v_cache, k_scale, v_scale = kv
    options = {"window": window, "softcap": softcap}
    if q.dtype != torch.bfloat16:
        return kv_int8.paged_decode_attention_int8(q, kv, block_tables, ctx_lens, scale, **options)
    lib = native.load()
    assert lib is not None, "kernels.use() binds these ops only where the library built"
    _, block_size, kv_heads, head_dim = k_cache.shape
    assert k_cache.stride()[1:] == (kv_heads * head_dim, head_dim, 1), "rows not contiguous"
    assert k_scale.stride()[1:] == (kv_heads, 1) and v_scale.stride() == k_scale.stride()
    assert v_cache.stride() == k_cache.stride()
    b, q_heads, _ = q.shape
    q = q.contiguous()
    tables, lens = block_tables.contiguous(), ctx_lens.contiguous()
    assert tables.dtype == lens.dtype == torch.int64
    out = torch.empty_like(q)
    rc = lib.paged_decode_i8(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_scale.data_ptr(),
        v_scale.data_ptr(), k_cache.stride(0), k_scale.stride(0), tables.data_ptr(),
        tables.stride(0), lens.data_ptr(), b, q_heads, kv_heads, head_dim, block_size, scale,
        window or 0, softcap or 0.0, out.data_ptr(),
    )  # fmt: skip
    if rc != 0:  # no AVX-512 VNNI, head_dim not in 32s or over 256, no memory: torch's turn
        return kv_int8.paged_decode_attention_int8(q, kv, tables, lens, scale, **options)
    return out
