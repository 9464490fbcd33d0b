"""Per-step attention metadata and the attention layer that applies it to the paged cache.

Tokens of one step are packed into one flat batch: first every multi-token (prefill or
chunk) segment, then one token per decoding sequence. The runner builds this once per step;
every layer reuses it.
"""

from dataclasses import dataclass

import torch
from torch import nn

from kernels import extend_attention, paged_decode_attention, write_kv


@dataclass(slots=True)
class PrefillSegment:
    start: int  # first row in the flat batch
    num_new: int
    ctx_len: int  # cached + new tokens after this step
    block_table: torch.Tensor


@dataclass(slots=True)
class AttentionMetadata:
    slot_blocks: torch.Tensor  # [T] where each new token's K/V goes
    slot_offsets: torch.Tensor  # [T]
    prefills: list[PrefillSegment]
    decode_start: int  # rows [decode_start:] are single-token decodes
    decode_block_tables: torch.Tensor | None  # [B, max_blocks]
    decode_ctx_lens: torch.Tensor | None  # [B]


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5

    def forward(
        self,
        q: torch.Tensor,  # [T, heads, head_dim], rope applied
        k: torch.Tensor,  # [T, kv_heads, head_dim]
        v: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],  # this layer's cache views
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        k_cache, v_cache = kv
        write_kv(k_cache, v_cache, k, v, meta.slot_blocks, meta.slot_offsets)
        out = torch.empty_like(q)
        for p in meta.prefills:
            rows = slice(p.start, p.start + p.num_new)
            out[rows] = extend_attention(
                q[rows], k_cache, v_cache, p.block_table, p.ctx_len, self.scale
            )
        if meta.decode_block_tables is not None:
            out[meta.decode_start :] = paged_decode_attention(
                q[meta.decode_start :],
                k_cache,
                v_cache,
                meta.decode_block_tables,
                meta.decode_ctx_lens,
                self.scale,
            )
        return out
