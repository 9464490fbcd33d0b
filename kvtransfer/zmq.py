"""KV blocks as zero-copy ZeroMQ frames (tcp or ipc): the two-sided transport.

The pool is [num_blocks, block_nbytes] bytes (baton.cache.kv_cache): a run of consecutive
block ids is one contiguous range, so it goes as ONE frame straight from the pool's memory
(zmq copy=False), and the receiver copies it into its own, possibly scattered, blocks.
"""

from collections.abc import Callable

import torch

from baton import protocol as P
from baton.kvtransfer.base import Landed


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
    if any(not len(f) or len(f) % pool.shape[1] for f in frames):  # from a broken peer
        raise ValueError(f"frames of {[len(f) for f in frames]} B are not whole blocks")
    rows = [
        r for f in frames for r in torch.frombuffer(f, dtype=torch.uint8).view(-1, pool.shape[1])
    ]
    if len(rows) != len(dst_block_ids):
        raise ValueError(f"received {len(rows)} blocks for {len(dst_block_ids)} reserved")
    for dst, row in zip(dst_block_ids, rows, strict=True):
        pool[dst].copy_(row)
    return len(rows) * pool.shape[1]


class ZmqReader:
    """Asks the prefill for the bytes (KVPull); they come back on the KV socket as KVBlocks
    frames, which the decode hands to `receive`."""

    def __init__(self, transport: str, send: Callable[[P.KVPull], None], pool: torch.Tensor):
        self.transport, self.send, self.pool = transport, send, pool
        self.wanted: dict[str, list[int]] = {}  # req_id -> our reserved blocks
        self.landed: list[Landed] = []

    def start(self, req_id: str, src_ids: list[int], dst_ids: list[int]) -> None:
        self.wanted[req_id] = dst_ids
        self.send(P.KVPull(req_id, src_ids))

    def receive(self, msg: P.KVBlocks, frames: list) -> None:
        dst_ids = self.wanted.pop(msg.req_id, None)
        if dst_ids is None:
            return  # cancelled: those blocks may belong to another request by now
        try:
            nbytes = write_blocks(self.pool, frames, dst_ids)
        except ValueError as e:
            self.landed.append(Landed(msg.req_id, 0, 0, f"bad KV transfer: {e}"))
            return
        self.landed.append(Landed(msg.req_id, nbytes, len(frames)))

    def poll(self) -> list[Landed]:
        landed, self.landed = self.landed, []
        return landed

    def cancel(self, req_id: str) -> bool:
        self.wanted.pop(req_id, None)  # frames still on the way are dropped in `receive`
        return True

    def close(self) -> None:
        self.wanted.clear()
