"""The decode service: one process, one loop.

drain the KV and gateway sockets -> reserve own blocks for offered requests and pull their
KV -> one continuous-batching step over everything running -> stream each new token (with
its index) to the gateway.

Sequences join as their KV lands and leave when done, every step. When blocks run out the
scheduler preempts and the sequence is recomputed here (counted in baton_recomputes).
"""

import logging
import time
from dataclasses import dataclass

import msgspec
import zmq

from baton import protocol as P
from baton.engine import Engine
from baton.request import Sequence
from baton.scheduler import SampledToken
from baton.service_io import (
    BAD_MESSAGES,
    KV_BYTES_RECEIVED,
    RECOMPUTES,
    ServiceLoop,
    serve_probe,
)
from kvtransfer.zmq import write_blocks

log = logging.getLogger("baton.decode")


@dataclass
class Pending:
    """An offered request whose KV has not landed yet."""

    seq: Sequence
    peer: bytes  # the prefill's socket identity
    num_computed: int
    pulled_at: float | None = None  # when KVPull went out (blocks reserved)


@dataclass
class Peer:
    last_seen: float
    refused: str | None = None


class DecodeService(ServiceLoop):
    role = "decode"

    def __init__(
        self,
        engine: Engine,
        service_id: str,
        gateway_addr: str,
        kv_addr: str,
        *,
        transfer_timeout_s: float = 10.0,
        peer_timeout_s: float = 5.0,
    ):
        super().__init__(engine, service_id, gateway_addr)
        self.transfer_timeout_s, self.peer_timeout_s = transfer_timeout_s, peer_timeout_s
        self.kv_sock = self.ctx.socket(zmq.ROUTER)
        self.kv_sock.setsockopt(zmq.LINGER, 0)
        self.kv_sock.bind(kv_addr)
        self.kv_addr = self.kv_sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.codec = P.Codec(P.PrefillToDecode)
        self.layout = engine.layout()
        self.pool = engine.kv.block_bytes()
        self.pending: dict[str, Pending] = {}
        self.peers: dict[bytes, Peer] = {}
        self.preemptions_seen = 0

    def sockets(self) -> list[zmq.Socket]:
        return [self.gateway.sock, self.kv_sock]

    def drain(self) -> None:
        for msg in self.gateway.recv_all():
            if isinstance(msg, P.Abort):
                self.abort(msg.req_id)
        self.drain_kv()
        self.pull_what_fits()

    def on_token(self, seq: Sequence, token: SampledToken, finished: bool) -> None:
        self.send_token(seq, token, finished)

    def housekeeping(self) -> None:
        RECOMPUTES.labels(self.id).inc(self.sched.num_preemptions - self.preemptions_seen)
        self.preemptions_seen = self.sched.num_preemptions
        self.check_timeouts()
        if self.keepalives.due():
            self.keepalive()

    # --- KV hand-off (pull) ------------------------------------------------------------------
    def drain_kv(self) -> None:
        while self.kv_sock.poll(0):
            identity, *frames = self.kv_sock.recv_multipart(copy=False)
            peer_id = identity.bytes
            peer = self.peers.setdefault(peer_id, Peer(time.monotonic()))
            peer.last_seen = time.monotonic()
            try:
                msg = self.codec.decode(frames[0].bytes)
            except (msgspec.DecodeError, IndexError) as e:
                BAD_MESSAGES.labels(self.id).inc()
                log.warning("dropped a malformed KV message: %s", e)
                continue
            if isinstance(msg, P.Hello):
                if msg.layout != self.layout:
                    peer.refused = f"layout {msg.layout} != {self.layout}"
                    log.error("REFUSED prefill %s: %s", msg.prefill_id, peer.refused)
                self.send_peer(peer_id, P.HelloReply(peer.refused is None, peer.refused or ""))
            elif isinstance(msg, P.KVOffer):
                self.on_offer(peer_id, peer, msg)
            elif isinstance(msg, P.KVBlocks):
                self.on_blocks(peer_id, msg, [f.buffer for f in frames[1:]])
            elif isinstance(msg, P.KVAbort):
                pending = self.pending.pop(msg.req_id, None)
                if pending:
                    self.engine.kv_manager.free(pending.seq)
                    self.fail(msg.req_id, f"prefill aborted the hand-off: {msg.reason}")

    def on_offer(self, peer_id: bytes, peer: Peer, offer: P.KVOffer) -> None:
        if peer.refused:
            self.send_peer(peer_id, P.KVAbort(offer.req_id, "KV layout refused"))
            return
        seq = Sequence(
            offer.req_id, offer.token_ids, offer.params, num_prompt_tokens=offer.num_prompt_tokens
        )
        try:
            self.sched.check_fits(seq.num_tokens, offer.params.max_tokens - seq.num_output_tokens)
        except ValueError as e:
            self.send_peer(peer_id, P.KVRelease(offer.req_id))
            self.fail(offer.req_id, str(e))
            return
        self.pending[offer.req_id] = Pending(seq, peer_id, offer.num_computed)

    def pull_what_fits(self) -> None:
        """Reserve our own blocks for offers, oldest first, and pull their bytes. Keep enough
        free blocks for the running batch to grow by one block each."""
        kv = self.engine.kv_manager
        headroom = len(self.sched.running)
        for req_id, p in self.pending.items():
            if p.pulled_at is not None:
                continue
            if kv.blocks_needed(p.num_computed) + headroom > kv.pool.num_free:
                break
            kv.allocate(p.seq, p.num_computed)
            p.pulled_at = time.monotonic()
            self.send_peer(p.peer, P.KVPull(req_id))

    def on_blocks(self, peer_id: bytes, msg: P.KVBlocks, frames: list) -> None:
        p = self.pending.pop(msg.req_id, None)
        self.send_peer(peer_id, P.KVRelease(msg.req_id))  # the prefill may free its copy now
        if p is None:
            return  # aborted while in flight: its blocks were already freed
        try:
            nbytes = write_blocks(self.pool, frames, p.seq.block_ids)
        except ValueError as e:
            self.engine.kv_manager.free(p.seq)
            self.fail(msg.req_id, f"bad KV transfer: {e}")
            return
        KV_BYTES_RECEIVED.labels(self.id).inc(nbytes)
        p.seq.num_computed_tokens = p.num_computed
        self.engine.kv_manager.cache_computed(p.seq)
        self.sched.add(p.seq)

    def send_peer(self, peer_id: bytes, msg) -> None:
        self.kv_sock.send_multipart([peer_id, self.codec.encode(msg)])

    # --- endings -------------------------------------------------------------------------
    def abort(self, req_id: str) -> None:
        if self.sched.abort(req_id):
            return
        p = self.pending.pop(req_id, None)
        if p is not None:
            self.engine.kv_manager.free(p.seq)
            self.send_peer(p.peer, P.KVRelease(req_id))

    def check_timeouts(self) -> None:
        """A pull unanswered, or a prefill gone silent while we wait on it: fail fast."""
        now = time.monotonic()
        for req_id, p in list(self.pending.items()):
            peer = self.peers.get(p.peer)
            silent = peer is None or now - peer.last_seen > self.peer_timeout_s
            stuck = p.pulled_at is not None and now - p.pulled_at > self.transfer_timeout_s
            if silent or stuck:
                del self.pending[req_id]
                self.engine.kv_manager.free(p.seq)
                why = "stopped answering" if silent else "did not send the KV in time"
                self.fail(req_id, f"prefill {p.peer.decode()} {why}")

    def keepalive(self) -> None:
        """Renews the prefills' leases on blocks they hold for us."""
        now = time.monotonic()
        for peer_id, peer in list(self.peers.items()):
            if now - peer.last_seen > 60:  # long gone; forget it
                del self.peers[peer_id]
            else:
                self.send_peer(peer_id, P.KeepAlive())

    def load(self) -> P.Load:
        pool = self.engine.kv_manager.pool
        queued = sum(p.num_computed for p in self.pending.values())
        return P.Load(queued, len(self.sched.running), pool.num_free, pool.num_blocks)


def main(
    engine: Engine, service_id: str, gateway_addr: str, kv_addr: str, http_port: int | None
) -> None:
    service = DecodeService(engine, service_id, gateway_addr, kv_addr)
    if http_port:
        serve_probe(http_port, service.status)
    service.run_forever()
