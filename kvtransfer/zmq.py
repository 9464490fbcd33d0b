"""KV blocks as zero-copy ZeroMQ frames (tcp or ipc).

The pool is [num_blocks, block_nbytes] bytes (baton.cache.kv_cache): a run of consecutive
block ids is one contiguous range, so it goes as ONE frame straight from the pool's memory
(zmq copy=False), and the receiver copies it into its own, possibly scattered, blocks.
"""

import torch


def coalesce(block_ids: list[int]) -> list[tuple[int, int]]:
    """[5, 6, 7, 2, 3, 9] -> [(5, 3), (2, 2), (9, 1)]: runs of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for b in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


def block_frames(pool: torch.Tensor, block_ids: list[int]) -> tuple[list[tuple[int, int]], list]:
    """The runs and, per run, a zero-copy buffer over the pool's bytes."""
    runs = coalesce(block_ids)
    return runs, [memoryview(pool[start : start + n].numpy()) for start, n in runs]


def write_blocks(pool: torch.Tensor, frames: list, dst_block_ids: list[int]) -> int:
    """Copy received frames into the destination's own blocks, in order; returns bytes."""
    rows = [
        r for f in frames for r in torch.frombuffer(f, dtype=torch.uint8).view(-1, pool.shape[1])
    ]
    if len(rows) != len(dst_block_ids):
        raise ValueError(f"received {len(rows)} blocks for {len(dst_block_ids)} reserved")
    for dst, row in zip(dst_block_ids, rows, strict=True):
        pool[dst].copy_(row)
    return len(rows) * pool.shape[1]
