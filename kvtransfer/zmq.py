"""KV blocks as zero-copy ZeroMQ frames (tcp or ipc): the two-sided transport.

The pool is [num_blocks, block_nbytes] bytes (baton.cache.kv_cache): a run of consecutive
block ids is one contiguous range, so it goes as ONE frame straight from the pool's memory
(zmq copy=False), and the receiver copies it into its own, possibly scattered, blocks.
"""

from collections.abc import Callable

import torch

from baton import protocol as P
from baton.kvtransfer.base import InPart, Landed


def coalesce(block_ids: list[int]) -> list[tuple[int, int]]:
    """[5, 6, 7, 2, 3, 9] -> [(5, 3), (2, 2), (9, 1)]: runs of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for b in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


def block_frames(
    pool: torch.Tensor, block_ids: list[int], in_part: InPart | None = None
) -> tuple[list[tuple[int, int]], list]:
    """The runs and, per run, a buffer of its bytes: zero-copy over the pool where its blocks
    go whole; gathered, their ranges block by block, for the leading ones pulled in part."""
    n = in_part.num_blocks if in_part else 0
    part, whole = coalesce(block_ids[:n]), coalesce(block_ids[n:])
    frames = [
        memoryview(
            torch.cat([pool[b : b + c, o : o + size] for o, size in in_part.ranges], 1).numpy()
        )
        for b, c in part
    ]
    frames += [memoryview(pool[b : b + c].numpy()) for b, c in whole]
    return part + whole, frames


def write_blocks(
    pool: torch.Tensor, frames: list, dst_block_ids: list[int], in_part: InPart | None = None
) -> int:
    """Copy received frames into the destination's own blocks, in order (block_frames' rows:
    the leading `in_part` ones only their ranges); returns bytes."""
    n = in_part.num_blocks if in_part else 0
    part_width = in_part.nbytes if in_part else 0
    rows: list[torch.Tensor] = []
    for f in frames:
        width = part_width if len(rows) < n else pool.shape[1]
        if not len(f) or len(f) % width:  # from a broken peer
            raise ValueError(f"a frame of {len(f)} B is not whole rows of {width} B")
        got = torch.frombuffer(f, dtype=torch.uint8).view(-1, width)
        if len(rows) < n < len(rows) + len(got):
            raise ValueError("a frame spans blocks sent in part and whole")
        rows.extend(got)
    if len(rows) != len(dst_block_ids):
        raise ValueError(f"received {len(rows)} blocks for {len(dst_block_ids)} reserved")
    for i, (dst, row) in enumerate(zip(dst_block_ids, rows, strict=True)):
        if i >= n:
            pool[dst].copy_(row)
            continue
        at = 0
        for offset, size in in_part.ranges:
            pool[dst, offset : offset + size].copy_(row[at : at + size])
            at += size
    return sum(len(r) for r in rows)


class ZmqReader:
    """Asks the prefill for the bytes (KVPull); they come back on the KV socket as KVBlocks
    frames, which the decode hands to `receive`."""

    def __init__(self, transport: str, send: Callable[[P.KVPull], None], pool: torch.Tensor):
        self.transport, self.send, self.pool = transport, send, pool
        # req_id -> our reserved blocks, and which are read in part
        self.wanted: dict[str, tuple[list[int], InPart | None]] = {}
        self.landed: list[Landed] = []

    def start(
        self, req_id: str, src_ids: list[int], dst_ids: list[int], in_part: InPart | None = None
    ) -> None:
        self.wanted[req_id] = dst_ids, in_part
        if in_part is None:
            self.send(P.KVPull(req_id, src_ids))
        else:
            self.send(P.KVPull(req_id, src_ids, in_part.num_blocks, list(in_part.ranges)))

    def receive(self, msg: P.KVBlocks, frames: list) -> None:
        dst_ids, in_part = self.wanted.pop(msg.req_id, (None, None))
        if dst_ids is None:
            return  # cancelled: those blocks may belong to another request by now
        try:
            nbytes = write_blocks(self.pool, frames, dst_ids, in_part)
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
