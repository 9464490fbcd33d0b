"""Attention over the paged KV cache in torch: the reference for the C ops
(paged_attention_native.py) and the Triton ones (paged_attention_triton.py).

Cache views are [num_blocks, block_size, kv_heads, head_dim]; a block table lists a sequence's
blocks in order, so token t of the sequence lives at (table[t // block_size], t % block_size).
GQA: query head h reads KV head h // (q_heads // kv_heads).

Why it looks the way it does (CPU, measured in benchmarks/RESULTS.md): a block's rows of one
layer are one contiguous range, so `gather_blocks` copies whole blocks with index_select (a
memcpy per block) where advanced indexing copies element by element. Scores and outputs are
plain batched matmuls in chunks of queries: torch's CPU SDPA kernel is ~10x slower than them for
one query row and ~8x slower for a causal 2k-token prompt in bf16.

Two options some families' layers take (Gemma 2/3, Mistral, sliding Qwen2 layers): `window`,
a query sees only the last `window` positions up to its own, and `softcap`, scores become
softcap * tanh(score / softcap) before the softmax. The C ops take both; the Triton ops
hand such calls to these.
"""

import functools
from collections.abc import Callable

import torch

QUERY_CHUNK = 64  # query rows per matmul in extend: bounds the scores to chunk x context


def sliding_and_capped_by(reference: Callable) -> Callable[[Callable], Callable]:
    """Decorates an op that has neither `window` nor `softcap`: calls that set either run
    `reference` (the torch op with the same arguments) instead."""

    def decorate(op: Callable) -> Callable:
        @functools.wraps(op)
        def call(*args, window: int | None = None, softcap: float | None = None, **kwargs):
            if window is None and softcap is None:
                return op(*args, **kwargs)
            return reference(*args, window=window, softcap=softcap, **kwargs)

        return call

    return decorate


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Blocks `block_ids` ([N]) of a cache view, whole: [N * block_size, kv_heads, head_dim]."""
    return cache.flatten(1).index_select(0, block_ids).view(-1, *cache.shape[2:])


def extend_attention(
    q: torch.Tensor,  # [n, q_heads, head_dim]: the newest n tokens of one sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [>= ceil(ctx_len / block_size)]
    ctx_len: int,  # tokens in the cache including the n new ones (already written)
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """New tokens attend causally to themselves and to the cached prefix (chunked prefill,
    prefix hits). Returns [n, q_heads, head_dim]."""
    n, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group = q_heads // kv_heads
    blocks = block_table[: -(-ctx_len // k_cache.shape[1])]
    kt = gather_blocks(k_cache, blocks)[:ctx_len].permute(1, 2, 0).contiguous()  # [kvh, d, ctx]
    v = gather_blocks(v_cache, blocks)[:ctx_len].transpose(0, 1).contiguous()  # [kvh, ctx, d]
    # the scale goes on q so that the scores leave the matmul ready for softmax
    qg = (q * scale).view(n, kv_heads, group, head_dim).permute(1, 2, 0, 3)  # [kvh, g, n, d]
    out = torch.empty(n, kv_heads, group, head_dim, dtype=q.dtype, device=q.device)
    first = ctx_len - n  # position of query row 0
    for lo in range(0, n, QUERY_CHUNK):
        hi = min(n, lo + QUERY_CHUNK)
        rows, seen = hi - lo, first + hi  # keys past the chunk's last query: never seen
        chunk = qg[:, :, lo:hi].reshape(kv_heads, group * rows, head_dim)
        scores = torch.bmm(chunk, kt[:, :, :seen]).view(kv_heads, group, rows, seen)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        # only the chunk's own keys are causal; the prefix before them is seen by every row
        future = torch.ones(rows, rows, dtype=torch.bool, device=q.device).triu_(1)
        scores[..., first + lo :].masked_fill_(future, float("-inf"))
        if window is not None:  # row r (position first + lo + r) sees keys past its own - window
            oldest = torch.arange(first + lo, first + hi, device=q.device) - window
            too_old = torch.arange(seen, device=q.device) <= oldest.unsqueeze(1)
            scores.masked_fill_(too_old, float("-inf"))
        probs = torch.softmax(scores, -1)  # bf16 in and out, computed in fp32 inside
        o = torch.bmm(probs.view(kv_heads, group * rows, seen), v[:, :seen])
        out[lo:hi] = o.view(kv_heads, group, rows, head_dim).permute(2, 0, 1, 3)
    return out.view(n, q_heads, head_dim)


def extend_attention_varlen(
    q: torch.Tensor,  # [T, q_heads, head_dim]: new tokens of S sequences, packed
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks], padded with any valid block id
    cu_seqlens: torch.Tensor,  # [S + 1] sequence i's rows are cu_seqlens[i]:cu_seqlens[i + 1]
    ctx_lens: torch.Tensor,  # [S] tokens in the cache per sequence, new ones included
    max_num_new: int,  # sizes the Triton grid; the torch path needs no bound
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """extend_attention over a packed batch of sequences. Returns [T, q_heads, head_dim]."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for i, ctx_len in enumerate(ctx_lens.tolist()):
        rows = slice(bounds[i], bounds[i + 1])
        out[rows] = extend_attention(
            q[rows], k_cache, v_cache, block_tables[i], ctx_len, scale, window, softcap
        )
    return out


def paged_decode_attention(
    q: torch.Tensor,  # [B, q_heads, head_dim]: one new token per sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks], padded with any valid block id
    ctx_lens: torch.Tensor,  # [B] tokens in the cache per sequence, the new one included
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """One query per sequence over its whole cached context. Returns [B, q_heads, head_dim]."""
    b, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group = q_heads // kv_heads
    # [B, S * kv_heads, head_dim] as gathered, with no transpose to copy: every query head
    # meets every KV head in one matmul and the scores of its own KV head are kept. GQA
    # multiplies the (small) attention flops, never the bytes read.
    k = gather_blocks(k_cache, block_tables.flatten()).view(b, -1, head_dim)
    v = gather_blocks(v_cache, block_tables.flatten()).view(b, -1, head_dim)
    s = k.shape[1] // kv_heads
    scores = torch.bmm(q, k.transpose(1, 2)).view(b, kv_heads, group, s, kv_heads)
    own = scores.diagonal(dim1=1, dim2=4).float().mul_(scale)  # [B, group, S, kv_heads]
    if softcap is not None:
        own = torch.tanh(own / softcap) * softcap
    positions = torch.arange(s, device=q.device)
    invalid = positions >= ctx_lens.unsqueeze(1)
    if window is not None:  # the query sits at ctx - 1
        invalid |= positions < (ctx_lens - window).unsqueeze(1)
    invalid = invalid.view(b, 1, s, 1)
    probs = own.masked_fill_(invalid, float("-inf")).softmax(2)
    spread = torch.zeros(b, kv_heads, group, s, kv_heads, dtype=v.dtype, device=v.device)
    spread.diagonal(dim1=1, dim2=4).copy_(probs)  # zero weight on the other heads' values
    return torch.bmm(spread.view(b, q_heads, s * kv_heads), v).view(b, q_heads, head_dim)
