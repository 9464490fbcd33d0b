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


class Reader(Protocol):
    transport: str  # what /health and the metrics call it: zmq-tcp | zmq-ipc | shm | nixl

    def start(self, req_id: str, src_ids: list[int], dst_ids: list[int]) -> None:
        """Begin copying the peer's blocks `src_ids` into ours, `dst_ids` (same length);
        raises TransferError if the peer cannot be read at all."""
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
