"""Per-step attention metadata and the attention layer that applies it to the paged cache.

Tokens of one step are packed into one flat batch: first every multi-token (prefill or
chunk) segment, then one token per decoding sequence. The runner builds this once per step;
every layer reuses it.
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from baton import kernels


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
    # the prefill segments packed for one varlen kernel call per layer, built once per step
    prefill_block_tables: torch.Tensor = field(init=False)  # [S, max_blocks]
    prefill_cu_seqlens: torch.Tensor = field(init=False)  # [S + 1]
    prefill_ctx_lens: torch.Tensor = field(init=False)  # [S]
    prefill_max_num_new: int = field(init=False)

    def __post_init__(self) -> None:
        device = self.slot_blocks.device
        width = max((len(p.block_table) for p in self.prefills), default=0)
        # padded with block 0: any valid id will do, the kernels read only ctx_len tokens
        tables = torch.zeros(len(self.prefills), width, dtype=torch.long, device=device)
        for row, p in zip(tables, self.prefills, strict=True):
            row[: len(p.block_table)] = p.block_table
        self.prefill_block_tables = tables
        starts = [p.start for p in self.prefills] + [self.decode_start]
        self.prefill_cu_seqlens = torch.tensor(starts, device=device)
        self.prefill_ctx_lens = torch.tensor([p.ctx_len for p in self.prefills], device=device)
        self.prefill_max_num_new = max((p.num_new for p in self.prefills), default=0)


class PagedAttention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
    ):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.window, self.softcap = scale, window, softcap

    def forward(
        self,
        q: torch.Tensor,  # [T, heads, head_dim], rope applied
        k: torch.Tensor,  # [T, kv_heads, head_dim]
        v: torch.Tensor,
        kv: tuple[torch.Tensor, ...],  # this layer's cache views (KVCache.layers)
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        quantized = len(kv) == 4  # (K, V, K scales, V scales): 8-bit (baton.cache.kv_cache)
        write = kernels.write_kv_int8 if quantized else kernels.write_kv
        write(*kv, k, v, meta.slot_blocks, meta.slot_offsets)
        parts = []  # the prompts' rows, then the decodes': one of them alone is the output
        if meta.prefills:
            extend = (
                kernels.extend_attention_varlen_int8
                if quantized
                else kernels.extend_attention_varlen
            )
            parts.append(
                extend(
                    q[: meta.decode_start],
                    *((kv,) if quantized else kv),
                    meta.prefill_block_tables,
                    meta.prefill_cu_seqlens,
                    meta.prefill_ctx_lens,
                    meta.prefill_max_num_new,
                    self.scale,
                    window=self.window,
                    softcap=self.softcap,
                )
            )
        if meta.decode_block_tables is not None:
            decode = (
                kernels.paged_decode_attention_int8 if quantized else kernels.paged_decode_attention
            )
            parts.append(
                decode(
                    q[meta.decode_start :],
                    *((kv,) if quantized else kv),
                    meta.decode_block_tables,
                    meta.decode_ctx_lens,
                    self.scale,
                    window=self.window,
                    softcap=self.softcap,
                )
            )
        return parts[0] if len(parts) == 1 else torch.cat(parts)
