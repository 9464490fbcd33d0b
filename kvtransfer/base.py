"""What every KV transport gives the decode: a Reader, made once per prefill peer at the
handshake (kvtransfer.handshake), that moves a request's blocks from the prefill's pool into
blocks the decode reserved.

    decode                                  prefill
    reader.start(req_id, src_ids, dst_ids)
      zmq:       KVPull(src_ids) -------->  KVBlocks + one frame per run  (two-sided)
      shm, nixl: copy the leased blocks straight out of the prefill's pool (one-sided)
    reader.poll() -> Landed(req_id, ...)
    KVRelease(req_id, num_bytes) -------->  frees its blocks (the lease ends)

A streamed prompt is read in several pieces (one start() per offer, one at a time per request)
before its single KVRelease.

The prefill never frees a leased block before KVRelease (or lease expiry), so a read can
never see a reused block; the decode never frees a destination block while a read may still
write into it (`cancel` says when it is safe).
"""

from typing import NamedTuple, Protocol

from baton.cache.kv_manager import blocks_behind


class TransferError(Exception):
    """A peer's blocks cannot be read (it died, or it is gone from the transport)."""


class Unreachable(Exception):
    """No socket can connect to a peer's address."""


class Stop(NamedTuple):
    """A request whose hand-off ended so that it stops at this service: the service aborts
    its sequence, and tells the gateway `why` unless None (then the request ended anyway, or
    the other side reports it). retryable: another service may resume it."""

    req_id: str
    why: str | None
    retryable: bool = True


class Landed(NamedTuple):
    """A read that ended: its bytes are in the destination blocks, unless `error`."""

    req_id: str
    num_bytes: int
    num_runs: int  # descriptors / frames / copies: contiguous runs of blocks
    error: str | None = None


class InPart(NamedTuple):
    """Blocks read only in part: those a model's sliding-window layers no longer see need
    only the other layers' bytes (baton.cache.kv_cache.full_layer_ranges)."""

    num_blocks: int  # the read's leading blocks
    ranges: tuple[tuple[int, int], ...]  # (offset, nbytes) within a block, in order, not empty

    @property
    def nbytes(self) -> int:
        """What each of those blocks moves."""
        return sum(size for _, size in self.ranges)


class Window(NamedTuple):
    """A model with sliding-window layers, as the decode reads its hand-offs."""

    tokens: int  # a query sees this many positions, its own the last
    block_size: int
    ranges: tuple[tuple[int, int], ...]  # full_layer_ranges

    def blocks_behind(self, first_position: int) -> int:
        """Leading blocks no sliding layer reads once the queries start at `first_position`."""
        return blocks_behind(first_position, self.tokens, self.block_size)


class Reader(Protocol):
    transport: str  # what /health and the metrics call it: zmq-tcp | zmq-ipc | shm | nixl

    def start(
        self, req_id: str, src_ids: list[int], dst_ids: list[int], in_part: InPart | None = None
    ) -> None:
        """Begin copying the peer's blocks `src_ids` into ours, `dst_ids` (same length), the
        leading `in_part.num_blocks` of them only in its ranges; raises TransferError if the
        peer cannot be read at all."""
        ...

    def poll(self) -> list[Landed]:
        """Reads that ended since the last poll, each reported once."""
        ...

    def cancel(self, req_id: str) -> bool:
        """Stop waiting for a read. True: its destination blocks may be freed now; False: a
        transfer may still write them, and poll() reports it when it ends."""
        ...

    def close(self) -> None:
        """Forget the peer (it left, or a restarted one said Hello)."""
        ...


def joint_runs(src_ids: list[int], dst_ids: list[int]) -> list[tuple[int, int, int]]:
    """(src, dst, count) runs where both sides are consecutive: one copy each.
    [4, 5, 6, 9] -> [0, 1, 7, 8] gives [(4, 0, 2), (6, 7, 1), (9, 8, 1)]."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_ids, dst_ids, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def split_runs(
    src_ids: list[int], dst_ids: list[int], in_part: InPart | None
) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """joint_runs of the blocks read in part (the leading ones), then of those read whole."""
    n = in_part.num_blocks if in_part else 0
    return joint_runs(src_ids[:n], dst_ids[:n]), joint_runs(src_ids[n:], dst_ids[n:])


def read_nbytes(num_blocks: int, block_nbytes: int, in_part: InPart | None) -> int:
    """The bytes a read of `num_blocks` blocks moves."""
    if in_part is None:
        return num_blocks * block_nbytes
    n = in_part.num_blocks
    return n * in_part.nbytes + (num_blocks - n) * block_nbytes


def valid_in_part(in_part: InPart, num_blocks: int, block_nbytes: int, num_layers: int) -> bool:
    """A peer's InPart: within the blocks named, its ranges in order without overlap inside a
    block (no pull asks for more than the blocks' bytes), and no more of them than a block has
    layers (values and int8 scales apart)."""
    ends = [0, *(o + size for o, size in in_part.ranges)]
    return (
        0 < in_part.num_blocks <= num_blocks
        and 0 < len(in_part.ranges) <= 2 * num_layers
        and all(size > 0 and o >= end for (o, size), end in zip(in_part.ranges, ends, strict=False))
        and ends[-1] <= block_nbytes
    )
