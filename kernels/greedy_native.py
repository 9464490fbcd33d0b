"""Sampling's ops in C for the CPU (kernels/csrc/greedy.c), the same results as
kernels/greedy.py: the argmax, where torch runs the reduction one element at a time; the token
bitmask, which torch can only apply after widening each bit to a byte (~2 ms for 32 rows)."""

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


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """In place: logits[rows[r], t] = -inf where bit t % 32 of bitmask[r, t // 32] is 0."""
    if logits.dtype != torch.float32 or not logits.is_contiguous():
        return greedy.apply_token_bitmask(logits, bitmask, rows)
    lib = native.load()
    assert lib is not None, "kernels.use() binds this op only where the library built"
    bitmask, rows = bitmask.contiguous(), rows.contiguous()
    assert bitmask.dtype == torch.int32 and rows.dtype == torch.int64
    assert lib.apply_token_bitmask_f32(
        logits.data_ptr(), logits.shape[1], bitmask.data_ptr(), bitmask.shape[1],
        rows.data_ptr(), len(rows),
    ) == 0  # fmt: skip
