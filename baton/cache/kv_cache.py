"""Paged KV storage, preallocated once.

Layout: one tensor [num_blocks, num_layers, 2 (K, V), block_size, kv_heads, head_dim],
block-major, so every layer's K and V of block b are ONE contiguous range of `block_nbytes`
bytes starting at b * block_nbytes. A hand-off of n blocks is n ranges (fewer once contiguous
runs are coalesced), never a per-layer gather. Layer l's K view is data[:, l, 0]:
[num_blocks, block_size, kv_heads, head_dim] with a block stride of the whole block.

8-bit (kv_dtype "int8"): each value is an int8 times a fp32 scale per (token, KV head),
amax / 127 of that row, written once with the token (a block fills a token at a time, so a
per-block scale would have to be fixed before the block's later rows are known). A block
holds its int8 values, as above, then its scales [num_layers, 2, block_size, kv_heads]: still
one range, so hand-offs move it unchanged. Layer l's views are (K, V, K scales, V scales).
"""

import math
import mmap

import torch

from baton.model.llama import ModelArgs

SCALE_DTYPE = torch.float32


def full_layer_ranges(
    args: ModelArgs, block_size: int, dtype: torch.dtype
) -> tuple[tuple[int, int], ...]:
    """(offset, nbytes) within a block of the KV (and int8 scales) of every layer that is not
    a sliding-window one, neighbours merged: what a block holds that a sliding layer's window
    has left behind is still needed for. Empty where every layer slides (Mistral)."""
    full = [i for i in range(args.num_layers) if i not in args.sliding_layers]
    rows = 2 * block_size * args.num_kv_heads  # a layer's K and V rows
    sections = [(0, rows * args.head_dim * dtype.itemsize)]  # values, then int8's scales
    if dtype == torch.int8:
        sections.append((args.num_layers * sections[0][1], rows * SCALE_DTYPE.itemsize))
    ranges: list[tuple[int, int]] = []
    for start, per_layer in sections:
        for i in full:
            offset = start + i * per_layer
            if ranges and sum(ranges[-1]) == offset:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + per_layer)
            else:
                ranges.append((offset, per_layer))
    return tuple(ranges)


def block_nbytes(args: ModelArgs, block_size: int, dtype: torch.dtype) -> int:
    rows = args.num_layers * 2 * block_size * args.num_kv_heads
    if dtype == torch.int8:
        return rows * (args.head_dim + SCALE_DTYPE.itemsize)
    return rows * args.head_dim * dtype.itemsize


class KVCache:
    def __init__(
        self,
        args: ModelArgs,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        storage: torch.Tensor | None = None,
    ):
        """dtype: the cache's (the model's, or torch.int8); storage: zeroed uint8 memory of
        num_blocks * block_nbytes to live in; None: new."""
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        self.block_nbytes = block_nbytes(args, block_size, dtype)
        if storage is None:
            storage = private_memory(num_blocks * self.block_nbytes)
        self.bytes = storage.view(num_blocks, self.block_nbytes)
        rows = (args.num_layers, 2, block_size, args.num_kv_heads)
        values = self.bytes[:, : math.prod(rows) * args.head_dim * dtype.itemsize]
        self.data = _view(values, dtype, (*rows, args.head_dim))
        self.layers: list[tuple[torch.Tensor, ...]] = [
            (self.data[:, i, 0], self.data[:, i, 1]) for i in range(args.num_layers)
        ]
        if dtype == torch.int8:
            scales = _view(self.bytes[:, values.shape[1] :], SCALE_DTYPE, rows)
            self.layers = [
                (*kv, scales[:, i, 0], scales[:, i, 1]) for i, kv in enumerate(self.layers)
            ]

    def block_bytes(self) -> torch.Tensor:
        """The whole pool as [num_blocks, block_nbytes] uint8: row b is block b's bytes."""
        return self.bytes


def private_memory(nbytes: int) -> torch.Tensor:
    """Zeroed uint8 memory of this process, in 2 MiB pages where the kernel gives them
    (transparent huge pages, also in their `madvise` mode): a decode step reads every
    sequence's blocks from all over the pool, and in 4 KiB pages each block costs TLB misses
    (RESULTS.md, 2026-12-07 fourth session). Anonymous and private: shared anonymous memory
    is shmem, which takes huge pages only where shmem_enabled allows. Touched here, so the
    whole pool is resident from the start, as torch.zeros made it."""
    mem = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mem.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(mem, dtype=torch.uint8)[:nbytes].zero_()


def _view(columns: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """[num_blocks, *shape] of `dtype` over some byte columns of every block (a strided view:
    the block stride stays block_nbytes)."""
    return columns.view(dtype).unflatten(1, shape)
