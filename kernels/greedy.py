"""Sampling's ops over the logits: greedy sampling's argmax over each row (torch's own op is
the reference, and what a CUDA engine uses: there it is fast), and a grammar's token bitmask
applied to its rows."""

import torch


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] -> [rows] int64: the first index of each row's largest value (a NaN
    counts as the largest)."""
    return logits.argmax(-1)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """In place: logits[rows[r], t] = -inf where bit t % 32 of bitmask[r, t // 32] is 0
    (llguidance's token bitmask, int32 words; a token past the mask is banned too)."""
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    allowed = torch.zeros(len(rows), logits.shape[1], dtype=torch.bool)
    width = min(logits.shape[1], bits.shape[1] * 32)
    allowed[:, :width] = bits.flatten(1)[:, :width].bool()
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
