"""Attention over the paged KV cache in Triton; kernels/paged_attention.py is the reference.

Both kernels gather keys token by token through the block table (token t of a sequence sits at
(table[t // block_size], t % block_size)), so any block size works and a tile of BLOCK_N tokens
may span several blocks. Softmax is the online (flash) form: a running max `m_i`, a running sum
`l_i` and an output accumulator rescaled whenever the max grows.

    decode:  grid (B, kv_heads, partitions). Each program takes one KV head's query heads
             (padded to 16 rows for tl.dot) over one partition of the context and writes a
             partial output with its log-sum-exp; a second kernel merges the partitions. Long
             contexts thus spread over many programs instead of one per (sequence, head).
    extend:  grid (query tiles, S, q_heads) over a packed (varlen) batch; query i of a
             sequence with c cached tokens sits at position c + i and sees keys 0..c + i.
"""

import torch
import triton
import triton.language as tl

from baton.kernels import paged_attention

MAX_PARTITIONS = 32  # bounds the merge kernel's tile; longer contexts get longer partitions


@triton.jit
def _cache_rows(block_table, t, mask, block_size, stride_block, stride_token):
    """Element offsets of tokens `t` of one sequence in a cache view (KV head 0, dim 0)."""
    block = tl.load(block_table + t // block_size, mask=mask, other=0)
    # int64: the block stride spans every layer, so block * stride overflows int32 in big pools
    return block.to(tl.int64) * stride_block + (t % block_size) * stride_token


def _precision(dtype: torch.dtype) -> str:
    # torch keeps tf32 off for fp32 matmuls; so must we, for fp32 models to match the reference
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _decode_partition_kernel(
    q, k_cache, v_cache, block_tables, ctx_lens, part_out, part_lse,
    scale, partition_size, block_size,
    stride_qb, stride_qh,
    stride_cb, stride_ct, stride_ch,
    stride_tb,
    stride_ob, stride_oh, stride_op,
    stride_lb, stride_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    seq, kv_head, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ctx_len = tl.load(ctx_lens + seq)
    start = part * partition_size
    end = tl.minimum(ctx_len, start + partition_size)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    head = kv_head * GROUP + g  # the query heads that read this KV head
    g_mask, d_mask = g < GROUP, d < HEAD_DIM
    qv = tl.load(
        q + seq * stride_qb + head[:, None] * stride_qh + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_G, BLOCK_D]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = block_tables + seq * stride_tb
    for n in range(start, end, BLOCK_N):
        t = n + tl.arange(0, BLOCK_N)
        t_mask = t < end
        rows = _cache_rows(table, t, t_mask, block_size, stride_cb, stride_ct) + kv_head * stride_ch
        kv_mask = t_mask[:, None] & d_mask[None, :]
        kv_mask_t = d_mask[:, None] & t_mask[None, :]
        kt = tl.load(k_cache + rows[None, :] + d[:, None], mask=kv_mask_t, other=0.0)
        s = tl.dot(qv, kt, input_precision=PRECISION) * scale  # [BLOCK_G, BLOCK_N]
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        v = tl.load(v_cache + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    # a partition past the end of a shorter sequence stays unwritten; the merge never reads it
    is_stored = g < tl.where(start < ctx_len, GROUP, 0)
    out_rows = part_out + seq * stride_ob + head * stride_oh + part * stride_op
    out_mask = is_stored[:, None] & d_mask[None, :]
    tl.store(out_rows[:, None] + d[None, :], acc / l_i[:, None], mask=out_mask)
    lse_rows = part_lse + seq * stride_lb + head * stride_lh + part
    tl.store(lse_rows, m_i + tl.log(l_i), mask=is_stored)


@triton.jit
def _decode_merge_kernel(
    part_out, part_lse, ctx_lens, out,
    partition_size,
    stride_pb, stride_ph, stride_pp,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    seq, head = tl.program_id(0), tl.program_id(1)
    num_parts = tl.cdiv(tl.load(ctx_lens + seq), partition_size)
    p = tl.arange(0, BLOCK_P)
    d = tl.arange(0, BLOCK_D)
    p_mask, d_mask = p < num_parts, d < HEAD_DIM
    lse_row = part_lse + seq * stride_lb + head * stride_lh
    lse = tl.load(lse_row + p, mask=p_mask, other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, 0))  # each partition's share of the softmax mass, unnormalized
    parts = tl.load(
        part_out + seq * stride_pb + head * stride_ph + p[:, None] * stride_pp + d[None, :],
        mask=p_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    merged = tl.sum(w[:, None] * parts, 0) / tl.sum(w, 0)
    tl.store(out + seq * stride_ob + head * stride_oh + d, merged, mask=d_mask)


@paged_attention.sliding_and_capped_by(paged_attention.paged_decode_attention)
def paged_decode_attention(
    q: torch.Tensor,  # [B, q_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim], any block stride
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks]
    ctx_lens: torch.Tensor,  # [B]
    scale: float,
    partition_size: int | None = None,  # tokens per program; a power of two >= 16
) -> torch.Tensor:
    b, q_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    assert q_heads % kv_heads == 0 and k_cache.stride() == v_cache.stride()
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1
    # the table width bounds every context without reading ctx_lens back from the device
    max_ctx = block_tables.shape[1] * block_size
    if partition_size is None:
        partition_size = max(512, triton.next_power_of_2(triton.cdiv(max_ctx, MAX_PARTITIONS)))
    assert partition_size >= 16 and partition_size & (partition_size - 1) == 0
    num_parts = triton.cdiv(max_ctx, partition_size)
    part_out = torch.empty(b, q_heads, num_parts, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(b, q_heads, num_parts, dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    group = q_heads // kv_heads
    _decode_partition_kernel[(b, kv_heads, num_parts)](
        q, k_cache, v_cache, block_tables, ctx_lens, part_out, part_lse,
        scale, partition_size, block_size,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        GROUP=group, HEAD_DIM=head_dim, PRECISION=_precision(q.dtype),
        BLOCK_G=max(16, triton.next_power_of_2(group)),  # tl.dot needs >= 16 rows
        BLOCK_N=min(64, partition_size), BLOCK_D=block_d,
    )  # fmt: skip
    out = torch.empty_like(q)
    _decode_merge_kernel[(b, q_heads)](
        part_out, part_lse, ctx_lens, out,
        partition_size,
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_P=triton.next_power_of_2(num_parts), BLOCK_D=block_d,
    )  # fmt: skip
    return out


@triton.jit
def _extend_kernel(
    q, k_cache, v_cache, block_tables, cu_seqlens, ctx_lens, out,
    scale, block_size,
    stride_qt, stride_qh,
    stride_cb, stride_ct, stride_ch,
    stride_tb,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    tile, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kv_head = head // GROUP
    q_start = tl.load(cu_seqlens + seq)
    num_new = tl.load(cu_seqlens + seq + 1) - q_start
    ctx_len = tl.load(ctx_lens + seq)
    num_cached = ctx_len - num_new

    i = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # index among the sequence's new tokens
    d = tl.arange(0, BLOCK_D)
    i_mask, d_mask = i < num_new, d < HEAD_DIM
    pos = num_cached + i
    row_offsets = (q_start + i)[:, None] * stride_qt + head * stride_qh + d[None, :]
    qv = tl.load(q + row_offsets, mask=i_mask[:, None] & d_mask[None, :], other=0.0)

    # keys past the tile's last query are masked for all its rows; a tile past the sequence's
    # new tokens (the grid is sized for the longest) has nothing to compute
    end = tl.minimum(ctx_len, num_cached + (tile + 1) * BLOCK_M)
    end = tl.where(tile * BLOCK_M < num_new, end, 0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables + seq * stride_tb
    for n in range(0, end, BLOCK_N):
        t = n + tl.arange(0, BLOCK_N)
        t_mask = t < end
        rows = _cache_rows(table, t, t_mask, block_size, stride_cb, stride_ct) + kv_head * stride_ch
        kv_mask = t_mask[:, None] & d_mask[None, :]
        kv_mask_t = d_mask[:, None] & t_mask[None, :]
        kt = tl.load(k_cache + rows[None, :] + d[:, None], mask=kv_mask_t, other=0.0)
        s = tl.dot(qv, kt, input_precision=PRECISION) * scale  # [BLOCK_M, BLOCK_N]
        # causal: every stored row sees key 0, so no row's max stays -inf
        s = tl.where(t[None, :] <= pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        v = tl.load(v_cache + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    out_offsets = (q_start + i)[:, None] * stride_ot + head * stride_oh + d[None, :]
    tl.store(out + out_offsets, acc / l_i[:, None], mask=i_mask[:, None] & d_mask[None, :])


@paged_attention.sliding_and_capped_by(paged_attention.extend_attention_varlen)
def extend_attention_varlen(
    q: torch.Tensor,  # [T, q_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks]
    cu_seqlens: torch.Tensor,  # [S + 1]
    ctx_lens: torch.Tensor,  # [S]
    max_num_new: int,
    scale: float,
) -> torch.Tensor:
    _, q_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    assert q_heads % kv_heads == 0 and k_cache.stride() == v_cache.stride()
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1
    block_m = 64
    out = torch.empty_like(q)
    grid = (triton.cdiv(max_num_new, block_m), ctx_lens.shape[0], q_heads)
    _extend_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_seqlens, ctx_lens, out,
        scale, block_size,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=q_heads // kv_heads, HEAD_DIM=head_dim, PRECISION=_precision(q.dtype),
        BLOCK_M=block_m, BLOCK_N=64, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
    )  # fmt: skip
    return out
