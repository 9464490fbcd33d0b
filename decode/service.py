"""The decode service: one process, one loop.

drain the KV and gateway sockets -> reserve own blocks for offered requests and read their
KV -> one continuous-batching step over everything running -> stream each new token (with
its index) to the gateway.

Sequences join as their KV lands and leave when done, every step. When blocks run out the
scheduler preempts and the sequence is recomputed here (counted in baton_recomputes).

Each prefill peer gets a Reader at its Hello (kvtransfer.handshake picks the transport): it
pulls the bytes over ZeroMQ, or copies them itself from the prefill's pool (shm, NIXL). Reads
in flight are polled each loop, never waited on. A streamed prompt is offered chunk by chunk;
each offer's new blocks are read as it comes (one read in flight per request), and KVRelease
follows once the final offer's blocks have all landed.
"""

import logging
import os
import time
from dataclasses import dataclass
from functools import partial

import msgspec
import zmq

from baton import protocol as P
from baton.config import EngineConfig
from baton.engine import Engine
from baton.kvtransfer import shm
from baton.kvtransfer.base import Landed, Reader, TransferError
from baton.kvtransfer.handshake import Refused, choose, start_nixl
from baton.kvtransfer.zmq import ZmqReader
from baton.probe import Probe
from baton.request import Sequence
from baton.scheduler import SampledToken
from baton.service_io import (
    BAD_MESSAGES,
    BATCH_CAP,
    KV_BYTES_RECEIVED,
    KV_TRANSPORT_BYTES,
    KV_TRANSPORT_RUNS,
    LOCAL_PREFILLS,
    RECOMPUTES,
    KVPeers,
    ServiceLoop,
    advertised,
)
from baton.slo import max_batch_for_tpot

log = logging.getLogger("baton.decode")


@dataclass
class Pending:
    """An offered request whose KV has not all landed yet."""

    seq: Sequence  # blocks for all of its KV are reserved at its first read
    peer: bytes  # the prefill's socket identity
    num_computed: int  # tokens the latest offer covers
    src_block_ids: list[int]  # the prefill's blocks holding them
    final: bool  # the prefill is done: no more offers
    num_read: int = 0  # leading blocks whose read started
    reading_since: float | None = None  # a read is in flight
    num_bytes: int = 0  # landed so far

    @property
    def unread(self) -> int:
        return len(self.src_block_ids) - self.num_read


@dataclass
class Peer:
    """A prefill that said Hello, and how we read from it (None: we refused it)."""

    prefill_id: str
    num_blocks: int
    last_seen: float
    reader: Reader | None
    refused: str = ""


class DecodeService(ServiceLoop):
    role = "decode"

    def __init__(
        self,
        engine: Engine,
        service_id: str,
        gateway_addr: str,
        kv_addr: str,
        transport: str = "zmq-tcp",
        *,
        # long: one engine step can take seconds on a CPU, and a dead peer is caught sooner
        # by the gateway (heartbeats), which aborts its requests here
        transfer_timeout_s: float = 30.0,
        peer_timeout_s: float = 30.0,
        tpot_s: float | None = None,
    ):
        super().__init__(engine, service_id, gateway_addr)
        self.transfer_timeout_s, self.peer_timeout_s = transfer_timeout_s, peer_timeout_s
        self.tpot_s, self.max_batch = tpot_s, self.sched.max_num_seqs
        self.kv_sock = self.ctx.socket(zmq.ROUTER)
        self.kv_sock.setsockopt(zmq.LINGER, 0)
        self.kv_sock.bind(kv_addr)
        self.kv_addr = advertised(self.kv_sock.getsockopt_string(zmq.LAST_ENDPOINT))
        self.zmq_transport = "zmq-ipc" if self.kv_addr.startswith("ipc://") else "zmq-tcp"
        self.codec = P.Codec(P.PrefillToDecode)
        self.layout = engine.layout()
        self.pool = engine.kv.block_bytes()
        self.transport = transport
        self.kv_peers = KVPeers(service_id, transport)
        self.nixl = start_nixl(transport, f"{service_id}-{os.getpid()}", self.pool)
        self.pending: dict[str, Pending] = {}
        self.peers: dict[bytes, Peer] = {}
        self.preemptions_seen = 0
        shm.sweep()  # segments of prefills that died while nobody watched

    def sockets(self) -> list[zmq.Socket]:
        return [self.gateway.sock, self.kv_sock]

    def drain(self) -> None:
        for msg in self.gateway.recv_all():
            if isinstance(msg, P.Abort):
                self.abort(msg.req_id)
            elif isinstance(msg, P.PrefillRequest):  # prefilled here: no KV hand-off
                self.prefill_locally(msg)
        self.drain_kv()
        self.pull_what_fits()
        for peer in list(self.peers.values()):
            for landed in peer.reader.poll() if peer.reader else ():
                self.on_landed(peer, landed)

    def on_token(self, seq: Sequence, token: SampledToken, finished: bool) -> None:
        self.send_token(seq, token, finished)

    def housekeeping(self) -> None:
        RECOMPUTES.labels(self.id).inc(self.sched.num_preemptions - self.preemptions_seen)
        self.preemptions_seen = self.sched.num_preemptions
        self.check_timeouts()
        if self.keepalives.due():
            self.keepalive()
            if self.tpot_s:  # the batch that keeps a step within the TPOT target
                # no guess from one batch size: a cap at that size would never see a larger one
                fit = self.step_times.fit(extrapolate=False)
                self.sched.max_num_seqs = max_batch_for_tpot(fit, self.tpot_s, self.max_batch)
                BATCH_CAP.labels(self.id).set(self.sched.max_num_seqs)

    def prefill_locally(self, msg: P.PrefillRequest) -> None:
        """A short prompt (or no prefill pool at all): cheaper here than a transfer. The
        scheduler mixes its chunks into the decode steps; token 0 goes out like any other."""
        if self.accept(msg):
            LOCAL_PREFILLS.labels(self.id).inc()

    # --- KV hand-off ---------------------------------------------------------------------
    def drain_kv(self) -> None:
        while self.kv_sock.poll(0):
            identity, *frames = self.kv_sock.recv_multipart(copy=False)
            peer_id = identity.bytes
            try:
                msg = self.codec.decode(frames[0].bytes)
            except (msgspec.DecodeError, IndexError) as e:
                BAD_MESSAGES.labels(self.id).inc()
                log.warning("dropped a malformed KV message: %s", e)
                continue
            if isinstance(msg, P.Hello):
                self.on_hello(peer_id, msg)
                continue
            peer = self.peers.get(peer_id)
            if peer is None:  # we restarted, or forgot it: it must say Hello again
                if isinstance(msg, P.KVOffer):
                    self.send_peer(peer_id, P.Rehello(msg.req_id))
                elif isinstance(msg, P.KVAbort):  # we hold nothing of it: it may let go
                    self.send_peer(peer_id, P.KVRelease(msg.req_id))
                continue
            peer.last_seen = time.monotonic()
            if isinstance(msg, P.KVOffer):
                self.on_offer(peer_id, peer, msg)
            elif isinstance(msg, P.KVBlocks) and isinstance(peer.reader, ZmqReader):
                peer.reader.receive(msg, [f.buffer for f in frames[1:]])
            elif isinstance(msg, P.KVAbort):
                p = self.pending.get(msg.req_id)
                if p is not None and p.peer == peer_id:
                    why = f"prefill aborted the hand-off: {msg.reason}"
                    self.end(msg.req_id, why if msg.failed else None)
                else:  # nothing of it here (any more): the prefill may let go of its blocks
                    self.send_peer(peer_id, P.KVRelease(msg.req_id))

    def on_hello(self, peer_id: bytes, hello: P.Hello) -> None:
        """Choose how to read from this prefill, once; a second Hello is a restarted one."""
        if peer_id in self.peers:
            self.forget(peer_id, "restarted")
        reader, refused, skipped = None, "", []
        try:
            if hello.layout != self.layout:
                raise Refused(f"KV layout {hello.layout} != ours {self.layout}")
            send = partial(self.send_peer, peer_id)
            zmq_reader = partial(ZmqReader, self.zmq_transport, send, self.pool)
            reader, skipped = choose(hello, self.transport, self.pool, self.nixl, zmq_reader)
        except Refused as e:
            refused = str(e)
            log.error("REFUSED prefill %s: %s", hello.prefill_id, refused)
        else:
            why = f" (skipped {'; '.join(skipped)})" if skipped else ""
            log.info("prefill %s: KV over %s%s", hello.prefill_id, reader.transport, why)
        self.peers[peer_id] = Peer(
            hello.prefill_id, hello.num_blocks, time.monotonic(), reader, refused
        )
        chosen = reader.transport if reader else ""
        self.kv_peers.set(hello.prefill_id, chosen or "refused")
        self.send_peer(peer_id, P.HelloReply(reader is not None, refused, chosen))

    def on_offer(self, peer_id: bytes, peer: Peer, offer: P.KVOffer) -> None:
        if peer.reader is None:
            self.send_peer(peer_id, P.KVAbort(offer.req_id, f"handshake refused: {peer.refused}"))
            return
        p = self.pending.get(offer.req_id)
        if p is not None and (p.peer != peer_id or p.final):
            # a repeat would orphan the blocks reserved for the first
            BAD_MESSAGES.labels(self.id).inc()
            log.warning("dropped a repeated offer of %s", offer.req_id)
            return
        seq = Sequence(
            offer.req_id, offer.token_ids, offer.params, num_prompt_tokens=offer.num_prompt_tokens
        )
        ids = offer.block_ids
        try:
            if not 0 <= offer.num_computed < seq.num_tokens:  # the last token is ours to run
                raise ValueError(f"bad KV offer: {offer.num_computed} of {seq.num_tokens} computed")
            if len(ids) != self.engine.kv_manager.blocks_needed(offer.num_computed) or (
                ids and not 0 <= min(ids) <= max(ids) < peer.num_blocks
            ):
                raise ValueError(f"bad KV offer: blocks {ids} for {offer.num_computed} tokens")
            if p is not None and not p.num_read <= len(ids) <= len(p.seq.block_ids or ids):
                raise ValueError(f"bad KV offer: {len(ids)} blocks after {p.num_read} were read")
            self.sched.check_request(seq)
        except ValueError as e:
            if p is not None:
                self.end(offer.req_id, str(e))
            else:
                self.send_peer(peer_id, P.KVRelease(offer.req_id))
                self.fail(offer.req_id, str(e))
            return
        if p is None:
            self.pending[offer.req_id] = Pending(seq, peer_id, offer.num_computed, ids, offer.final)
            return
        # the final offer adds the first sampled token; what was checked is what will run
        p.seq.token_ids, p.seq.params = seq.token_ids, seq.params
        p.num_computed, p.src_block_ids, p.final = offer.num_computed, ids, offer.final

    def pull_what_fits(self) -> None:
        """Reserve our own blocks for offered requests, oldest first, and read what was
        offered into them. A request's blocks are reserved whole at its first read (a
        streamed prompt's offers never wait on blocks that others hold half of), keeping
        enough free for the running batch to grow by one block each."""
        kv = self.engine.kv_manager
        headroom = len(self.sched.running)
        for req_id, p in list(self.pending.items()):
            if p.reading_since is not None:
                continue
            if not p.seq.block_ids:
                # all the KV it will hold: the prompt (a streamed offer's token_ids) or, once
                # final, what the prefill computed
                total = p.num_computed if p.final else p.seq.num_tokens
                if kv.blocks_needed(total) + headroom > kv.pool.num_free:
                    break
                kv.allocate(p.seq, total)  # num_computed_tokens is 0 until it joins
            if not p.unread:
                if p.final:  # nothing (more) to read
                    self.join(p)
                continue
            p.reading_since = time.monotonic()
            first, p.num_read = p.num_read, len(p.src_block_ids)
            peer = self.peers[p.peer]
            dst = p.seq.block_ids[first : p.num_read]
            try:
                peer.reader.start(req_id, p.src_block_ids[first:], dst)
            except TransferError as e:
                self.end(req_id, f"cannot read prefill {peer.prefill_id}: {e}")

    def on_landed(self, peer: Peer, landed: Landed) -> None:
        p = self.pending.get(landed.req_id)
        if p is None:
            return  # ended while in flight; its blocks were freed once that was safe
        if landed.error:
            self.end(landed.req_id, f"KV transfer from {peer.prefill_id} failed: {landed.error}")
            return
        p.reading_since, p.num_bytes = None, p.num_bytes + landed.num_bytes
        KV_BYTES_RECEIVED.labels(self.id).inc(landed.num_bytes)
        KV_TRANSPORT_BYTES.labels(self.id, peer.reader.transport).inc(landed.num_bytes)
        KV_TRANSPORT_RUNS.labels(self.id, peer.reader.transport).inc(landed.num_runs)
        if p.final and not p.unread:
            self.join(p)

    def join(self, p: Pending) -> None:
        """All of its KV is here: it joins the batch, and the prefill may free its blocks."""
        req_id = p.seq.req_id
        del self.pending[req_id]
        self.send_peer(p.peer, P.KVRelease(req_id, p.num_bytes))
        kv = self.engine.kv_manager
        keep = kv.blocks_needed(p.num_computed)  # more were reserved only for a broken peer
        kv.pool.release(p.seq.block_ids[keep:])
        del p.seq.block_ids[keep:]
        p.seq.num_computed_tokens = p.num_computed
        kv.cache_computed(p.seq)
        try:
            self.sched.add(p.seq)
        except ValueError as e:  # a final offer unlike the first (a broken peer)
            kv.free(p.seq)
            self.fail(req_id, str(e))

    def send_peer(self, peer_id: bytes, msg) -> None:
        self.kv_sock.send_multipart([peer_id, self.codec.encode(msg)])

    # --- endings -------------------------------------------------------------------------
    def end(self, req_id: str, why: str | None) -> None:
        """Drop a hand-off that will not join the batch: stop its read, free our blocks once
        nothing can write them, let the prefill free its own, and fail the request with `why`
        (None: the gateway ended it)."""
        p = self.pending.pop(req_id)
        peer = self.peers[p.peer]
        if p.reading_since is None or peer.reader is None or peer.reader.cancel(req_id):
            self.engine.kv_manager.free(p.seq)
        else:  # a transfer we cannot stop may still write them: never reuse them
            log.error("a read into %s's blocks is stuck; they stay reserved", req_id)
        self.send_peer(p.peer, P.KVRelease(req_id))
        if why is not None:  # the hand-off failed, not the request: the gateway may resume it
            self.fail(req_id, why, retryable=True)

    def abort(self, req_id: str) -> None:
        if self.sched.abort(req_id):
            return
        if req_id in self.pending:
            self.end(req_id, None)

    def forget(self, peer_id: bytes, why: str) -> None:
        """A prefill left (silent, or restarted): fail what waits on it, stop reading it."""
        peer = self.peers[peer_id]
        for req_id in [r for r, p in self.pending.items() if p.peer == peer_id]:
            self.end(req_id, f"prefill {peer.prefill_id} {why}")
        del self.peers[peer_id]
        if peer.reader is not None:
            peer.reader.close()
        self.kv_peers.set(peer.prefill_id, None)
        shm.sweep()  # a dead prefill's segment: nobody else may be left to unlink it

    def check_timeouts(self) -> None:
        """A read unanswered, or a prefill gone silent while we wait on it: fail fast."""
        now = time.monotonic()
        for req_id, p in list(self.pending.items()):
            peer = self.peers[p.peer]
            silent = now - peer.last_seen > self.peer_timeout_s
            stuck = p.reading_since is not None and now - p.reading_since > self.transfer_timeout_s
            if silent or stuck:
                why = "stopped answering" if silent else "did not send the KV in time"
                self.end(req_id, f"prefill {peer.prefill_id} {why}")

    def keepalive(self) -> None:
        """Renews the prefills' leases on blocks they hold for us; forgets silent ones."""
        now = time.monotonic()
        for peer_id, peer in list(self.peers.items()):
            if now - peer.last_seen > self.peer_timeout_s:
                self.forget(peer_id, "stopped answering")
            else:
                self.send_peer(peer_id, P.KeepAlive())

    def holds_work(self) -> bool:
        return bool(self.pending)

    def idle_wait_s(self) -> float:
        """A one-sided read (NIXL) lands with no message to wake the loop: poll it often."""
        reading = any(p.reading_since is not None for p in self.pending.values())
        return 0.001 if reading else super().idle_wait_s()

    def load(self) -> P.Load:
        pool = self.engine.kv_manager.pool
        queued = sum(p.num_computed for p in self.pending.values())
        return P.Load(queued, len(self.sched.running), pool.num_free, pool.num_blocks)


def main(
    config: EngineConfig,
    transport: str,
    service_id: str,
    gateway_addr: str,
    kv_addr: str,
    probe: Probe | None,
    tpot_s: float | None = None,
) -> None:
    service = DecodeService(
        Engine.build(config), service_id, gateway_addr, kv_addr, transport, tpot_s=tpot_s
    )
    if probe:
        probe.status = service.status
    service.run_forever()
