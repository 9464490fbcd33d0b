"""Greedy sampling's argmax in C for the CPU (kernels/csrc/greedy.c), the same indices as
kernels/greedy.py, where torch runs the reduction one element at a time."""

import torch

from baton.kernels import greedy, native


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] -> [rows] int64: the first index of each row's largest value (a NaN
    counts as the largest)."""
    if logits.dtype != torch.float32 or logits.dim() != 2 or logits.shape[1] == 0:
        return greedy.argmax(logits)
    lib = native.load()
    assert lib is not None, "kernels.use() binds this op only where the library built"
    logits = logits.contiguous()
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    assert lib.argmax_f32(logits.data_ptr(), *logits.shape, out.data_ptr()) == 0
    return out
