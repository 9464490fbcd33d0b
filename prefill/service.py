"""The prefill service: one process, one loop.

drain the gateway and decode sockets -> schedule a token budget (chunked prefill, prefix
cache) -> one forward -> send each finished prompt's first token to the gateway at once ->
offer its KV blocks to the chosen decode.

Hand-off is PULL (decode reads): prefill offers the block ids and keeps the blocks under a
lease; the decode reserves its own blocks only when it can take the request, then pulls.
Decode memory is never held while a prompt waits in prefill's queue. A lease pins every block
it offered (one extra reference each), and the pins go only on the decode's KVRelease or
lease expiry (no KeepAlive from that decode for `lease_s`): whatever happens to the request
here (finish, abort, preemption), no in-flight read can see a reused block.

Streaming (`stream_kv`): a prompt prefilled in several chunks is offered after each chunk
(KVOffer final=False, its full blocks so far), so the decode copies them while the next chunks
compute; the final offer leaves only the last chunk's blocks to move.

The bytes move over the transport the decode chose at the handshake (kvtransfer.handshake):
sent as frames on KVPull (ZeroMQ), or read by the decode itself from this pool (shm: the pool
lives in /dev/shm; NIXL: the pool is registered with this process's agent).
"""

import logging
import os
import time
from dataclasses import dataclass

import msgspec
import zmq

from baton import protocol as P
from baton.config import EngineConfig
from baton.engine import Engine
from baton.kvtransfer import shm
from baton.kvtransfer.handshake import kind, start_nixl
from baton.kvtransfer.zmq import block_frames
from baton.probe import Probe
from baton.request import Sequence
from baton.scheduler import SampledToken
from baton.service_io import (
    BAD_MESSAGES,
    KV_BYTES_SENT,
    KV_EARLY_OFFERS,
    KV_TRANSFERS,
    KV_TRANSPORT_BYTES,
    LEASES_EXPIRED,
    KVPeers,
    ServiceLoop,
)

log = logging.getLogger("baton.prefill")


@dataclass
class Lease:
    """Blocks pinned for one decode until it lets go of them."""

    peer: str  # decode kv address
    offer: P.KVOffer  # the latest, sent again to a decode that restarted
    pinned: list[int]
    ended_at: float | None = None  # the request ended here (finished or aborted): no error

    @property
    def ended(self) -> bool:
        return self.ended_at is not None


class DecodePeer:
    """A DEALER to one decode's KV socket; the handshake goes first, once."""

    def __init__(self, ctx: zmq.Context, addr: str, my_id: str, hello: bytes):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, my_id.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(addr)
        self.addr = addr
        self.last_seen = time.monotonic()
        self.refused: str | None = None
        self.transport = ""  # the decode's choice, from its HelloReply
        self.hello = hello
        self.say_hello()

    def say_hello(self) -> None:
        """Once until the decode answers: a restarted decode asks again (Rehello) for each
        offer it gets, and a second Hello would read to it as a second restart."""
        self.awaiting_reply = True
        self.sock.send(self.hello)


class PrefillService(ServiceLoop):
    role = "prefill"

    def __init__(
        self,
        engine: Engine,
        service_id: str,
        gateway_addr: str,
        transport: str = "zmq-tcp",
        shm_region: P.ShmRegion | None = None,
        lease_s: float = 60.0,  # a dead decode is caught sooner by the gateway, which aborts
        stream_kv: bool = True,
    ):
        """shm_region: where the pool lives when it is in shared memory (kvtransfer.shm)."""
        super().__init__(engine, service_id, gateway_addr)
        self.lease_s, self.stream_kv = lease_s, stream_kv
        self.codec = P.Codec(P.DecodeToPrefill)
        self.peers: dict[str, DecodePeer] = {}
        self.leases: dict[str, Lease] = {}
        self.routes: dict[str, str] = {}  # req_id -> decode kv addr, until handed off
        self.pool = engine.kv.block_bytes()
        self.kv_peers = KVPeers(service_id, transport)
        agent = start_nixl(transport, f"{service_id}-{os.getpid()}", self.pool)
        self.hello = P.Hello(
            service_id,
            engine.layout(),
            self.pool.shape[0],
            transport,
            shm_region,
            agent.region if agent else None,
        )
        self.nixl = agent  # decodes read through it: it lives as long as the service

    def sockets(self) -> list[zmq.Socket]:
        return [self.gateway.sock, *(p.sock for p in self.peers.values())]

    def drain(self) -> None:
        for msg in self.gateway.recv_all():
            self.on_gateway(msg)
        for peer in list(self.peers.values()):
            self.drain_peer(peer)

    def housekeeping(self) -> None:
        self.expire_leases()
        if self.keepalives.due():  # tells decodes we are alive while they wait to pull
            for peer in self.peers.values():
                peer.sock.send(self.codec.encode(P.KeepAlive()))

    # --- gateway messages ----------------------------------------------------------------
    def on_gateway(self, msg) -> None:
        if isinstance(msg, P.PrefillRequest):
            if self.accept(msg):
                self.routes[msg.req_id] = msg.decode_kv_addr
        elif isinstance(msg, P.Abort):
            self.routes.pop(msg.req_id, None)
            self.sched.abort(msg.req_id)
            self.let_go(msg.req_id, "aborted by the gateway")

    def on_chunk(self, seq: Sequence) -> None:
        """Offer the full blocks a chunk completed, while the rest of the prompt computes."""
        addr = self.routes.get(seq.req_id)
        lease = self.leases.get(seq.req_id)
        full = seq.num_computed_tokens // self.engine.kv_manager.block_size
        if self.stream_kv and addr and full > (len(lease.offer.block_ids) if lease else 0):
            if self.offer(addr, seq, full * self.engine.kv_manager.block_size, final=False):
                KV_EARLY_OFFERS.labels(self.id).inc()

    def on_token(self, seq: Sequence, token: SampledToken, finished: bool) -> None:
        """Token 0 goes to the gateway now: TTFT never waits for the KV transfer."""
        self.send_token(seq, token, finished)
        self.load_changed = True  # a prompt left the queue: admission should know at once
        addr = self.routes.pop(seq.req_id, None)
        if addr is None:
            return
        if finished:  # nothing to hand off (a decode it was streamed to lets go)
            self.let_go(seq.req_id, "finished at its first token")
        elif self.offer(addr, seq, seq.num_computed_tokens, final=True):
            self.sched.running.remove(seq)
            self.engine.kv_manager.free(seq)  # the lease's pins keep the blocks

    def offer(self, addr: str, seq: Sequence, num_computed: int, final: bool) -> bool:
        """Offer `seq`'s KV up to `num_computed` to the decode at `addr`, pinning its blocks
        under the lease; False if that decode cannot take it (the request failed here)."""
        try:
            peer = self.peer(addr)
        except zmq.ZMQError as e:  # an address no socket can connect to: fail this one only
            return self.drop(seq.req_id, f"cannot connect to decode {addr!r}: {e}", True)
        if peer.refused:
            return self.drop(seq.req_id, f"decode {addr} refused the KV layout: {peer.refused}")
        ids = seq.block_ids[: self.engine.kv_manager.blocks_needed(num_computed)]
        if (lease := self.leases.get(seq.req_id)) is not None:
            # after a preemption the prompt's first blocks are computed again into new ones;
            # the decode has (or is reading) the pinned ones, whose KV is the same
            done = len(lease.offer.block_ids)
            ids = lease.offer.block_ids + ids[done:]
        offer = P.KVOffer(
            seq.req_id, seq.token_ids, seq.num_prompt_tokens, num_computed, seq.params, ids, final
        )
        lease = self.leases.setdefault(seq.req_id, Lease(addr, offer, []))
        for b in ids[len(lease.pinned) :]:
            self.engine.kv_manager.pool.share(b)
            lease.pinned.append(b)
        lease.offer = offer
        peer.sock.send(self.codec.encode(offer))
        return True

    def drop(self, req_id: str, why: str, retryable: bool = False) -> bool:
        """The hand-off of a request still here cannot happen: free it and fail it."""
        self.routes.pop(req_id, None)
        self.sched.abort(req_id)
        self.release(req_id)
        self.fail(req_id, why, retryable)
        return False

    def let_go(self, req_id: str, why: str) -> None:
        """The request ended here: its decode lets go of what was offered (KVRelease)."""
        if (lease := self.leases.get(req_id)) is not None and not lease.ended:
            lease.ended_at = time.monotonic()
            self.peers[lease.peer].sock.send(self.codec.encode(P.KVAbort(req_id, why, False)))

    # --- decode peers --------------------------------------------------------------------
    def peer(self, addr: str) -> DecodePeer:
        if addr not in self.peers:
            hello = self.codec.encode(self.hello)
            self.peers[addr] = DecodePeer(self.ctx, addr, self.id, hello)
        return self.peers[addr]

    def drain_peer(self, peer: DecodePeer) -> None:
        while peer.sock.poll(0):
            raw = peer.sock.recv()
            peer.last_seen = time.monotonic()
            try:
                msg = self.codec.decode(raw)
            except msgspec.DecodeError as e:
                BAD_MESSAGES.labels(self.id).inc()
                log.warning("dropped a malformed message from %s: %s", peer.addr, e)
                continue
            lease = self.leases.get(getattr(msg, "req_id", ""))
            if lease is not None and lease.peer != peer.addr:
                lease = None  # only the decode it was offered to speaks for it
            if isinstance(msg, P.HelloReply):
                self.on_hello_reply(peer, msg)
            elif isinstance(msg, P.Rehello):  # the decode restarted: handshake, offer again
                if not peer.awaiting_reply:
                    peer.say_hello()
                if lease is not None and not lease.ended:
                    peer.sock.send(self.codec.encode(lease.offer))
            elif isinstance(msg, P.KVPull):
                self.send_blocks(peer, msg)
            elif isinstance(msg, P.KVRelease) and lease is not None:
                if msg.req_id in self.routes:  # it gave up mid-prefill: stop computing it
                    self.routes.pop(msg.req_id)
                    self.sched.abort(msg.req_id)
                if self.release(msg.req_id) and msg.num_bytes:
                    KV_BYTES_SENT.labels(self.id).inc(msg.num_bytes)
                    KV_TRANSPORT_BYTES.labels(self.id, peer.transport).inc(msg.num_bytes)
                    KV_TRANSFERS.labels(self.id).inc()
            elif isinstance(msg, P.KVAbort) and lease is not None:
                self.end_lease(msg.req_id, f"decode {peer.addr} aborted the hand-off: {msg.reason}")

    def on_hello_reply(self, peer: DecodePeer, msg: P.HelloReply) -> None:
        peer.awaiting_reply = False
        if msg.ok:
            peer.refused, peer.transport = None, msg.transport
            log.info("decode %s takes our KV over %s", peer.addr, msg.transport)
        else:
            peer.refused = msg.reason
            log.error("decode %s REFUSED the KV handshake: %s", peer.addr, msg.reason)
        self.kv_peers.set(peer.addr, peer.transport if msg.ok else "refused")

    def send_blocks(self, peer: DecodePeer, pull: P.KVPull) -> None:
        lease = self.leases.get(pull.req_id)
        if lease is None or lease.ended or not set(pull.block_ids) <= set(lease.pinned):
            # gone meanwhile (or never offered): tell the decode, which holds reserved blocks
            peer.sock.send(self.codec.encode(P.KVAbort(pull.req_id, "no longer held")))
            return
        runs, frames = block_frames(self.pool, pull.block_ids)
        header = self.codec.encode(P.KVBlocks(pull.req_id, runs))
        # copy=False: frames point into the pool; the pins keep those blocks until release
        peer.sock.send_multipart([header, *frames], copy=False)

    def release(self, req_id: str) -> bool:
        lease = self.leases.pop(req_id, None)
        if lease is None:
            return False
        self.engine.kv_manager.pool.release(lease.pinned)
        return True

    def expire_leases(self) -> None:
        now = time.monotonic()
        for req_id, lease in list(self.leases.items()):
            # an ended one expires on its own (a decode that never knew it would keep it
            # alive with keep-alives); its reads time out well before (transfer_timeout_s)
            since = lease.ended_at if lease.ended else self.peers[lease.peer].last_seen
            if now - since > self.lease_s:
                log.warning("lease on %s expired: decode %s silent", req_id, lease.peer)
                LEASES_EXPIRED.labels(self.id).inc()
                self.end_lease(req_id, f"decode {lease.peer} stopped answering")

    def end_lease(self, req_id: str, why: str) -> None:
        """The decode gave up (or went silent): free the pins; fail the request if it is
        still alive, so the gateway can resume it elsewhere."""
        if self.leases[req_id].ended:
            self.release(req_id)
        else:
            self.drop(req_id, why, retryable=True)

    def holds_work(self) -> bool:
        return bool(self.leases or self.routes)

    def load(self) -> P.Load:
        pool = self.engine.kv_manager.pool
        queued = sum(
            s.num_tokens - s.num_computed_tokens for s in (*self.sched.waiting, *self.sched.running)
        )
        return P.Load(
            queued,
            len(self.sched.running),
            pool.num_free,
            pool.num_blocks,
            ahead_tokens=self.sched.ahead_tokens(),
            chunk_tokens=self.sched.max_chunk_tokens,
        )


def main(
    config: EngineConfig,
    transport: str,
    service_id: str,
    gateway_addr: str,
    probe: Probe | None,
    stream_kv: bool = True,
) -> None:
    segment = (
        shm.Segment(required=transport == "shm") if kind(transport) in ("auto", "shm") else None
    )
    engine = Engine.build(config, kv_storage=segment.create if segment else None)
    region = segment.region if segment else None
    service = PrefillService(
        engine, service_id, gateway_addr, transport, region, stream_kv=stream_kv
    )
    if probe:
        probe.status = service.status
    service.run_forever()  # exits after SIGTERM and a drain, unlinking the segment
