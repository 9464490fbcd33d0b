"""Attention over the paged KV cache, torch reference (Triton: paged_attention_triton.py).

Cache views are [num_blocks, block_size, kv_heads, head_dim]; a block table lists a sequence's
blocks in order, so token t of the sequence lives at (table[t // block_size], t % block_size).
GQA: query head h reads KV head h // (q_heads // kv_heads).
"""

import torch
import torch.nn.functional as F


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The first `num_tokens` cached tokens of one sequence: [num_tokens, kv_heads, head_dim]."""
    return cache[block_table].flatten(0, 1)[:num_tokens]


def extend_attention(
    q: torch.Tensor,  # [n, q_heads, head_dim]: the newest n tokens of one sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [>= ceil(ctx_len / block_size)]
    ctx_len: int,  # tokens in the cache including the n new ones (already written)
    scale: float,
) -> torch.Tensor:
    """New tokens attend causally to themselves and to the cached prefix (chunked prefill,
    prefix hits). Returns [n, q_heads, head_dim]."""
    n = q.shape[0]
    k = gather_kv(k_cache, block_table, ctx_len).transpose(0, 1)
    v = gather_kv(v_cache, block_table, ctx_len).transpose(0, 1)
    if n == ctx_len:
        mask, causal = None, True
    else:  # query i sits at position ctx_len - n + i and sees keys 0..that position
        pos = torch.arange(ctx_len - n, ctx_len, device=q.device).unsqueeze(1)
        mask, causal = torch.arange(ctx_len, device=q.device).unsqueeze(0) <= pos, False
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
    )
    return out.transpose(0, 1)


def extend_attention_varlen(
    q: torch.Tensor,  # [T, q_heads, head_dim]: new tokens of S sequences, packed
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks], padded with any valid block id
    cu_seqlens: torch.Tensor,  # [S + 1] sequence i's rows are cu_seqlens[i]:cu_seqlens[i + 1]
    ctx_lens: torch.Tensor,  # [S] tokens in the cache per sequence, new ones included
    max_num_new: int,  # sizes the Triton grid; the reference needs no bound
    scale: float,
) -> torch.Tensor:
    """extend_attention over a packed batch of sequences. Returns [T, q_heads, head_dim]."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for i, ctx_len in enumerate(ctx_lens.tolist()):
        rows = slice(bounds[i], bounds[i + 1])
        out[rows] = extend_attention(q[rows], k_cache, v_cache, block_tables[i], ctx_len, scale)
    return out


def paged_decode_attention(
    q: torch.Tensor,  # [B, q_heads, head_dim]: one new token per sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks], padded with any valid block id
    ctx_lens: torch.Tensor,  # [B] tokens in the cache per sequence, the new one included
    scale: float,
) -> torch.Tensor:
    """One query per sequence over its whole cached context. Returns [B, q_heads, head_dim]."""
    # Plain matmuls, not SDPA: with one query row, torch's CPU flash kernel is ~10x slower.
    b, q_heads, head_dim = q.shape
    k = k_cache[block_tables].flatten(1, 2).transpose(1, 2)  # [B, kv_heads, S, head_dim]
    v = v_cache[block_tables].flatten(1, 2).transpose(1, 2)
    kv_heads, s = k.shape[1], k.shape[2]
    qg = q.view(b, kv_heads, q_heads // kv_heads, head_dim)  # query heads grouped by KV head
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [B, kv_heads, group, S]
    invalid = (torch.arange(s, device=q.device) >= ctx_lens.unsqueeze(1)).view(b, 1, 1, s)
    probs = scores.masked_fill(invalid, float("-inf")).softmax(-1).to(v.dtype)
    return torch.matmul(probs, v).view(b, q_heads, head_dim)
