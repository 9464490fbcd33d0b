"""Paged KV storage, preallocated once.

Layout: one tensor [num_blocks, num_layers, 2 (K, V), block_size, kv_heads, head_dim],
block-major, so every layer's K and V of block b are ONE contiguous range of `block_nbytes`
bytes starting at b * block_nbytes. A hand-off of n blocks is n ranges (fewer once contiguous
runs are coalesced), never a per-layer gather. Layer l's K view is data[:, l, 0]:
[num_blocks, block_size, kv_heads, head_dim] with a block stride of the whole block.
"""

import torch

from baton.model.llama import ModelArgs


def block_nbytes(args: ModelArgs, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty(0, dtype=dtype).element_size()
    return args.num_layers * 2 * block_size * args.num_kv_heads * args.head_dim * elem


class KVCache:
    def __init__(
        self,
        args: ModelArgs,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        storage: torch.Tensor | None = None,
    ):
        """storage: zeroed uint8 memory of num_blocks * block_nbytes to live in; None: new."""
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        shape = (num_blocks, args.num_layers, 2, block_size, args.num_kv_heads, args.head_dim)
        if storage is None:
            self.data = torch.zeros(shape, dtype=dtype)
        else:
            self.data = storage.view(dtype).view(shape)
        self.layers = [(self.data[:, i, 0], self.data[:, i, 1]) for i in range(args.num_layers)]
        self.block_nbytes = block_nbytes(args, block_size, dtype)

    def block_bytes(self) -> torch.Tensor:
        """The whole pool as [num_blocks, block_nbytes] uint8: row b is block b's bytes."""
        return self.data.view(self.num_blocks, -1).view(torch.uint8)
