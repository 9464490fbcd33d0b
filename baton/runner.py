"""One forward step over a scheduled batch: tensors in, sampled tokens out.

Shared by baton.LLM, the prefill service and the decode service; they differ only in what
they schedule and what they do with the output.
"""

import torch

from baton.cache.kv_cache import KVCache
from baton.model.attention import AttentionMetadata, PrefillSegment
from baton.model.llama import CausalLM
from baton.sampler import Sampler
from baton.scheduler import SampledToken, ScheduledSeq


class ModelRunner:
    def __init__(self, model: CausalLM, kv: KVCache, sampler: Sampler):
        self.model, self.kv, self.sampler = model, kv, sampler
        self.block_size = kv.block_size

    def _prepare(self, batch: list[ScheduledSeq]):
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slot_blocks: list[int] = []
        prefills: list[PrefillSegment] = []
        tables: list[list[int]] = []
        ctx_lens: list[int] = []
        decode_start = sum(s.num_new_tokens for s in batch if s.num_new_tokens > 1)
        for s in batch:
            seq, start = s.seq, s.seq.num_computed_tokens
            end = start + s.num_new_tokens
            if s.num_new_tokens > 1:
                table = torch.tensor(seq.block_ids[: -(-end // bs)])
                prefills.append(PrefillSegment(len(ids), s.num_new_tokens, end, table))
            else:
                tables.append(seq.block_ids[: -(-end // bs)])
                ctx_lens.append(end)
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slot_blocks.extend(seq.block_ids[p // bs] for p in range(start, end))
        pos = torch.tensor(positions)
        decode_tables = None
        if tables:
            width = max(map(len, tables))
            decode_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
        meta = AttentionMetadata(
            slot_blocks=torch.tensor(slot_blocks),
            slot_offsets=pos % bs,
            prefills=prefills,
            decode_start=decode_start,
            decode_block_tables=decode_tables,
            decode_ctx_lens=torch.tensor(ctx_lens) if ctx_lens else None,
        )
        return torch.tensor(ids), pos, meta

    @torch.inference_mode()
    def compute_logits(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, list[int]]:
        """Logits [N, vocab] (fp32) for the N entries of `batch` that sample this step, and
        their indices in `batch`."""
        order = sorted(range(len(batch)), key=lambda i: batch[i].num_new_tokens == 1)
        ordered = [batch[i] for i in order]  # prefill segments first, then decodes
        ids, pos, meta = self._prepare(ordered)
        hidden = self.model(ids, pos, self.kv.layers, meta)
        rows, sampling = [], []
        end = 0
        for i, s in zip(order, ordered, strict=True):
            end += s.num_new_tokens
            if s.samples:
                rows.append(end - 1)
                sampling.append(i)
        return self.model.compute_logits(hidden[rows]), sampling

    def run(self, batch: list[ScheduledSeq]) -> list[SampledToken | None]:
        logits, sampling = self.compute_logits(batch)
        out: list[SampledToken | None] = [None] * len(batch)
        tokens = self.sampler(logits, [batch[i].seq for i in sampling])
        for i, token in zip(sampling, tokens, strict=True):
            out[i] = token
        return out
