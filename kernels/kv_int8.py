"""The 8-bit KV cache in torch (baton/cache/kv_cache.py): quantize and write, and attention
that reads it. The attention ops dequantize the blocks a step reads into a bf16 scratch cache
and call the bound 16-bit ops on it: the reference for the C decode kernel
(paged_attention_native.paged_decode_attention_int8, which also rounds the query to int8 as
`quantize` does), and the extend path everywhere (prompts are compute-bound: the dequantized
copy costs little beside them).

Each row (token, KV head) is stored as int8 values and one fp32 scale, amax / 127 of the row:
round to nearest, so a value is off by at most half a step, amax / 254.
"""

import torch

from baton import kernels


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., head_dim] -> int8 values of the same shape and fp32 scales [...]."""
    xf = x.float()
    scale = xf.abs().amax(-1).clamp_min_(1e-8) / 127
    return (xf / scale.unsqueeze(-1)).round_().to(torch.int8), scale


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
    for cache, scales, x in ((k_cache, k_scale, k), (v_cache, v_scale, v)):
        q, s = quantize(x)
        cache[slot_blocks, slot_offsets] = q
        scales[slot_blocks, slot_offsets] = s


def dequantize_blocks(
    cache: torch.Tensor, scales: torch.Tensor, block_ids: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Blocks `block_ids` ([N]) as a [N, block_size, kv_heads, head_dim] cache of `dtype`."""
    q = cache.index_select(0, block_ids)
    return (q.float() * scales.index_select(0, block_ids).unsqueeze(-1)).to(dtype)


def _scratch(kv: tuple[torch.Tensor, ...], tables: torch.Tensor, dtype: torch.dtype):
    """The blocks `tables` name, dequantized into a scratch cache, and the tables renumbered
    to it."""
    ids, renumbered = torch.unique(tables, return_inverse=True)
    k_cache, v_cache, k_scale, v_scale = kv
    k = dequantize_blocks(k_cache, k_scale, ids, dtype)
    v = dequantize_blocks(v_cache, v_scale, ids, dtype)
    return k, v, renumbered


def paged_decode_attention_int8(
    q: torch.Tensor,  # [B, q_heads, head_dim]
    kv: tuple[torch.Tensor, ...],  # (K, V, K scales, V scales) of one layer
    block_tables: torch.Tensor,
    ctx_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    k, v, tables = _scratch(kv, block_tables, q.dtype)
    return kernels.paged_decode_attention(
        q, k, v, tables, ctx_lens, scale, window=window, softcap=softcap
    )


def extend_attention_varlen_int8(
    q: torch.Tensor,
    kv: tuple[torch.Tensor, ...],
    block_tables: torch.Tensor,
    cu_seqlens: torch.Tensor,
    ctx_lens: torch.Tensor,
    max_num_new: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    k, v, tables = _scratch(kv, block_tables, q.dtype)
    return kernels.extend_attention_varlen(
        q, k, v, tables, cu_seqlens, ctx_lens, max_num_new, scale, window=window, softcap=softcap
    )
