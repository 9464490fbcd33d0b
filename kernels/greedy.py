"""Greedy sampling's argmax over each row of the logits; torch's own op is the reference (and
what a CUDA engine uses: there it is fast)."""

import torch


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] -> [rows] int64: the first index of each row's largest value (a NaN
    counts as the largest)."""
    return logits.argmax(-1)
