"""KV blocks over NIXL (UCX): the decode READs the prefill's leased blocks one-sided into
its own reserved blocks. On one host UCX moves them with cross-memory attach; between hosts
over RDMA or TCP, through the same calls.

Once per process (`Agent`): an agent, the whole pool registered, and a descriptor list of it
with one descriptor per block. Once per peer, at the handshake (`NixlReader`): the peer's
agent metadata loaded and its pool's per-block list prepared. Per request: one
make_prepped_xfer("READ") with the two block id lists; NIXL merges descriptors that are
consecutive on both sides, so a run of blocks costs one descriptor (~6-10 us each) and no
Python touches the bytes. Blocks read in part (a sliding-window model's, kvtransfer.base.InPart)
go through a second pair of lists, each block cut into pieces at the ranges' edges, prepared
at the first such read: the blocks read whole are all of their pieces (merged again), those
read in part the covered ones, still one transfer.

A READ needs nothing of the prefill over shared memory, cross-memory attach or RDMA; over
UCX's TCP transport (hosts without RDMA) the prefill's worker must answer it: `Progress`.
"""

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch

from baton import protocol as P
from baton.kvtransfer.base import InPart, Landed, TransferError, read_nbytes, split_runs

log = logging.getLogger(__name__)

IDLE_S = 0.005  # how soon Progress sees a new lease
LOCAL = "NIXL_INIT_AGENT"  # NIXL's name for this process's own memory in a descriptor list


def unavailable() -> str | None:
    """Why NIXL cannot be used in this process, or None."""
    try:
        import nixl  # noqa: F401
    except ImportError as e:
        return f"nixl is not installed ({e}); pip install 'baton-serve[nixl]'"
    return None


def pieces(block_nbytes: int, ranges: tuple[tuple[int, int], ...]) -> tuple[list[int], list[int]]:
    """A block cut at the edges of `ranges`: each piece's start (the last ends the block), and
    which pieces the ranges cover. A block read whole is all of its pieces, which NIXL merges
    back into one descriptor; one read in part, the covered ones."""
    cuts = sorted({0, block_nbytes, *(o for o, _ in ranges), *(o + size for o, size in ranges)})
    covered = [i for i, c in enumerate(cuts[:-1]) if any(o <= c < o + n for o, n in ranges)]
    return cuts, covered


def piece_descs(addr: int, num_blocks: int, block_nbytes: int, cuts: list[int]) -> np.ndarray:
    """[num_blocks * pieces, 3] (address, length, device 0): row b * pieces + j is piece j of
    block b; with `cuts` [0, block_nbytes], one row per whole block."""
    starts = np.asarray(cuts[:-1], dtype=np.uint64)
    blocks = addr + np.arange(num_blocks, dtype=np.uint64)[:, None] * block_nbytes
    descs = np.zeros((num_blocks, len(starts), 3), dtype=np.uint64)
    descs[:, :, 0] = blocks + starts
    descs[:, :, 1] = np.diff(np.asarray(cuts, dtype=np.uint64))
    return descs.reshape(-1, 3)


class Agent:
    """This process's NIXL agent, with its whole KV pool registered once."""

    def __init__(self, name: str, pool: torch.Tensor):
        """pool: [num_blocks, block_nbytes] uint8, contiguous."""
        from nixl import _bindings
        from nixl._api import nixl_agent, nixl_agent_config

        # NIXL's errors share no base class but Exception; these are all of them
        self.errors = tuple(
            getattr(_bindings, n) for n in dir(_bindings) if n.startswith("nixl") and "Error" in n
        )
        self.disconnected = _bindings.nixlRemoteDisconnectError
        # No progress thread: it busy-polls a whole core. A READ needs no progress on the
        # target, and the initiator progresses inside transfer() and check_xfer_state().
        self.agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=False, backends=[]))
        # The default error mode makes a transfer wait on the target's worker (p50 12 ms for
        # 1 MiB, shared/machine.md); "none" does not, and a dead peer still fails the read.
        self.agent.create_backend("UCX", {"ucx_error_handling_mode": "none"})
        self.agent.register_memory(pool)
        self.num_blocks, self.block_nbytes = pool.shape
        self.addr, self.whole = pool.data_ptr(), [0, self.block_nbytes]
        self.local = self.dlist(LOCAL, self.addr, self.num_blocks, self.whole)
        self.region = P.NixlRegion(self.agent.get_agent_metadata(), self.addr, pool.numel())
        self.local_pieces: dict[tuple, Any] = {}  # ranges -> our pool's list of block pieces

    def dlist(self, owner: str, addr: int, num_blocks: int, cuts: list[int]) -> Any:
        """A pool (ours: LOCAL; a peer's: its agent) as NIXL's list of block pieces."""
        descs = piece_descs(addr, num_blocks, self.block_nbytes, cuts)
        return self.agent.prep_xfer_dlist(owner, descs, "DRAM")


class NixlReader:
    """Reads from one peer's registered pool; transfers in flight are polled, never waited on
    (except by `cancel`)."""

    transport = "nixl"

    def __init__(self, agent: Agent, region: P.NixlRegion):
        """Raises TransferError if NIXL cannot attach the peer."""
        self.agent, nx = agent, agent.agent
        try:
            self.peer = nx.add_remote_agent(region.agent_metadata)
            self.num_blocks = region.nbytes // agent.block_nbytes
            self.remote = agent.dlist(self.peer, region.addr, self.num_blocks, agent.whole)
        except agent.errors as e:
            raise TransferError(f"NIXL could not attach the prefill: {e}") from e
        self.region, self.remote_pieces = region, {}  # ranges -> its pool's block pieces
        self.in_flight: dict[str, tuple[Any, int, int]] = {}  # req_id -> handle, bytes, runs
        self.landed: list[Landed] = []
        self.gone: str | None = None  # why this peer cannot be read any more

    def start(
        self, req_id: str, src_ids: list[int], dst_ids: list[int], in_part: InPart | None = None
    ) -> None:
        """Blocks read in part go as their pieces (piece_lists): one transfer either way."""
        if self.gone:
            raise TransferError(self.gone)
        nx = self.agent.agent
        try:
            local, remote, dst, src = self.agent.local, self.remote, dst_ids, src_ids
            if in_part is not None:
                cuts, covered = pieces(self.agent.block_nbytes, in_part.ranges)
                local, remote = self.piece_lists(in_part.ranges, cuts)
                every, n = range(len(cuts) - 1), in_part.num_blocks
                dst, src = (
                    [b * len(every) + j for i, b in enumerate(ids) for j in (covered if i < n else every)]
                    for ids in (dst_ids, src_ids)
                )  # fmt: skip
            handle = nx.make_prepped_xfer("READ", local, dst, remote, src)
        except self.agent.errors as e:
            raise TransferError(f"NIXL could not prepare the read: {e}") from e
        num_bytes = read_nbytes(len(src_ids), self.agent.block_nbytes, in_part)
        self.in_flight[req_id] = (
            handle,
            num_bytes,
            sum(map(len, split_runs(src_ids, dst_ids, in_part))),
        )
        self.settle(req_id, self.state(partial(nx.transfer, handle)))

    def piece_lists(self, ranges: tuple[tuple[int, int], ...], cuts: list[int]) -> tuple:
        """Our pool and the peer's as lists of block pieces, each prepared at its first read
        in part (ours is shared by every reader)."""
        agent = self.agent
        if ranges not in agent.local_pieces:
            agent.local_pieces[ranges] = agent.dlist(LOCAL, agent.addr, agent.num_blocks, cuts)
        if ranges not in self.remote_pieces:
            self.remote_pieces[ranges] = agent.dlist(
                self.peer, self.region.addr, self.num_blocks, cuts
            )
        return agent.local_pieces[ranges], self.remote_pieces[ranges]

    def poll(self) -> list[Landed]:
        for req_id, (handle, _, _) in list(self.in_flight.items()):
            if req_id in self.in_flight:  # a disconnect settles them all at once
                self.settle(req_id, self.state(partial(self.agent.agent.check_xfer_state, handle)))
        landed, self.landed = self.landed, []
        return landed

    def state(self, call: Callable[[], str]) -> str:
        """DONE | PROC | ERR; a dead peer's error detaches it first."""
        try:
            return call()
        except self.agent.disconnected as e:
            log.error("prefill agent %s disconnected: %s", self.peer, e)
            self.detach(f"the prefill's NIXL agent disconnected: {e}")
        except self.agent.errors as e:
            log.error("NIXL read from %s failed: %s", self.peer, e)
        return "ERR"

    def settle(self, req_id: str, state: str) -> None:
        if state == "PROC" or req_id not in self.in_flight:
            return
        handle, num_bytes, num_runs = self.in_flight.pop(req_id)
        with contextlib.suppress(*self.agent.errors):
            handle.release()
        error = None if state == "DONE" else (self.gone or "NIXL read failed")
        self.landed.append(Landed(req_id, num_bytes, num_runs, error))

    def cancel(self, req_id: str) -> bool:
        """One look, never a wait (a peer that stopped answering would stall the whole loop,
        review L13): True if the read has ended; else it goes on, and poll() reports it."""
        if req_id not in self.in_flight:
            return True
        handle = self.in_flight[req_id][0]
        self.settle(req_id, self.state(partial(self.agent.agent.check_xfer_state, handle)))
        return req_id not in self.in_flight

    def detach(self, why: str) -> None:
        """Forget the peer in NIXL, once: its reads fail, and a restarted peer (a new agent)
        is attached afresh at its Hello."""
        if self.gone:
            return
        self.gone = why
        for req_id in list(self.in_flight):
            self.settle(req_id, "ERR")  # a dead peer's reads write nothing any more
        for dlist in (self.remote, *self.remote_pieces.values()):
            dlist.release()
        self.agent.agent.remove_remote_agent(self.peer)

    def close(self) -> None:
        """The receiver closes a reader once no read of it can still write (cancel, poll)."""
        self.detach("closed")


class Progress(threading.Thread):
    """The prefill's side of its peers' reads: UCX's TCP transport emulates a READ with
    messages that this worker must progress, or it never completes (tests/test_hosts.py saw
    every read between two hosts stuck until the decode's transfer timeout). NIXL's own
    progress thread busy-polls a core for good; this one polls only while `reading()` (a peer
    holds a lease on our blocks), every `every_s`."""

    def __init__(self, agent: Agent, reading: Callable[[], bool], every_s: float = 0.001):
        super().__init__(name="nixl-progress", daemon=True)
        self.agent, self.reading, self.every_s = agent, reading, every_s

    def run(self) -> None:
        while True:
            if not self.reading():
                time.sleep(IDLE_S)
                continue
            with contextlib.suppress(*self.agent.errors):  # a peer's failure is its reader's
                self.agent.agent.get_new_notifs()  # progresses the worker
            time.sleep(self.every_s)
