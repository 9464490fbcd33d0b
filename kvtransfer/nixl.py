"""KV blocks over NIXL (UCX): the decode READs the prefill's leased blocks one-sided into
its own reserved blocks. On one host UCX moves them with cross-memory attach; between hosts
over RDMA or TCP, through the same calls.

Once per process (`Agent`): an agent, the whole pool registered, and a descriptor list of it
with one descriptor per block. Once per peer, at the handshake (`NixlReader`): the peer's
agent metadata loaded and its pool's per-block list prepared. Per request: one
make_prepped_xfer("READ") with the two block id lists; NIXL merges descriptors that are
consecutive on both sides, so a run of blocks costs one descriptor (~6-10 us each) and no
Python touches the bytes.

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
from baton.kvtransfer.base import Landed, TransferError, joint_runs

log = logging.getLogger(__name__)

IDLE_S = 0.005  # how soon Progress sees a new lease


def unavailable() -> str | None:
    """Why NIXL cannot be used in this process, or None."""
    try:
        import nixl  # noqa: F401
    except ImportError as e:
        return f"nixl is not installed ({e}); pip install 'baton-serve[nixl]'"
    return None


def block_descs(addr: int, num_blocks: int, block_nbytes: int) -> np.ndarray:
    """[num_blocks, 3] (address, length, device 0): row b is block b."""
    descs = np.zeros((num_blocks, 3), dtype=np.uint64)
    descs[:, 0] = addr + np.arange(num_blocks, dtype=np.uint64) * block_nbytes
    descs[:, 1] = block_nbytes
    return descs


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
        num_blocks, self.block_nbytes = pool.shape
        descs = block_descs(pool.data_ptr(), num_blocks, self.block_nbytes)
        self.local = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", descs, "DRAM")
        self.region = P.NixlRegion(self.agent.get_agent_metadata(), pool.data_ptr(), pool.numel())


class NixlReader:
    """Reads from one peer's registered pool; transfers in flight are polled, never waited on
    (except by `cancel`)."""

    transport = "nixl"

    def __init__(self, agent: Agent, region: P.NixlRegion):
        """Raises TransferError if NIXL cannot attach the peer."""
        self.agent, nx = agent, agent.agent
        try:
            self.peer = nx.add_remote_agent(region.agent_metadata)
            num_blocks = region.nbytes // agent.block_nbytes
            descs = block_descs(region.addr, num_blocks, agent.block_nbytes)
            self.remote = nx.prep_xfer_dlist(self.peer, descs, "DRAM")
        except agent.errors as e:
            raise TransferError(f"NIXL could not attach the prefill: {e}") from e
        self.in_flight: dict[str, tuple[Any, int, int]] = {}  # req_id -> handle, bytes, runs
        self.landed: list[Landed] = []
        self.gone: str | None = None  # why this peer cannot be read any more

    def start(self, req_id: str, src_ids: list[int], dst_ids: list[int]) -> None:
        if self.gone:
            raise TransferError(self.gone)
        nx = self.agent.agent
        try:
            handle = nx.make_prepped_xfer("READ", self.agent.local, dst_ids, self.remote, src_ids)
        except self.agent.errors as e:
            raise TransferError(f"NIXL could not prepare the read: {e}") from e
        num_bytes = len(src_ids) * self.agent.block_nbytes
        self.in_flight[req_id] = (handle, num_bytes, len(joint_runs(src_ids, dst_ids)))
        self.settle(req_id, self.state(partial(nx.transfer, handle)))

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
        self.remote.release()
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
