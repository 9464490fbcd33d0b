"""The prefill service: one process, one loop.

drain the gateway and decode sockets -> schedule a token budget (chunked prefill, prefix
cache) -> one forward -> send each finished prompt's first token to the gateway at once ->
offer its KV blocks to the chosen decode.

Hand-off is PULL (decode reads): prefill offers the block ids and keeps the blocks under a
lease; the decode reserves its own blocks only when it can take the request, then pulls.
Decode memory is never held while a prompt waits in prefill's queue, and a block is freed only
on the decode's release, an abort, or lease expiry (no KeepAlive from that decode for
`lease_s`), so no in-flight transfer can see a reused block.

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
from baton.request import Sequence
from baton.scheduler import SampledToken
from baton.service_io import (
    BAD_MESSAGES,
    KV_BYTES_SENT,
    KV_TRANSFERS,
    KV_TRANSPORT_BYTES,
    LEASES_EXPIRED,
    KVPeers,
    ServiceLoop,
    serve_probe,
)
from kvtransfer import shm
from kvtransfer.handshake import kind, start_nixl
from kvtransfer.zmq import block_frames

log = logging.getLogger("baton.prefill")


@dataclass
class Lease:
    seq: Sequence
    peer: str  # decode kv address


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
        self.sock.send(hello)


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
    ):
        """shm_region: where the pool lives when it is in shared memory (kvtransfer.shm)."""
        super().__init__(engine, service_id, gateway_addr)
        self.lease_s = lease_s
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
            if self.sched.abort(msg.req_id) is None:
                self.release(msg.req_id)

    def on_token(self, seq: Sequence, token: SampledToken, finished: bool) -> None:
        """Token 0 goes to the gateway now: TTFT never waits for the KV transfer."""
        self.send_token(seq, token, finished)
        addr = self.routes.pop(seq.req_id, None)
        if finished or addr is None:
            return
        self.sched.running.remove(seq)  # the blocks now belong to the lease
        try:
            peer = self.peer(addr)
        except zmq.ZMQError as e:  # an address no socket can connect to: fail this one only
            self.engine.kv_manager.free(seq)
            self.fail(seq.req_id, f"cannot connect to decode {addr!r}: {e}", retryable=True)
            return
        if peer.refused:
            self.engine.kv_manager.free(seq)
            self.fail(seq.req_id, f"decode {addr} refused the KV layout: {peer.refused}")
            return
        self.leases[seq.req_id] = Lease(seq, addr)
        self.offer(peer, seq)

    def offer(self, peer: DecodePeer, seq: Sequence) -> None:
        offer = P.KVOffer(
            seq.req_id,
            seq.token_ids,
            seq.num_prompt_tokens,
            seq.num_computed_tokens,
            seq.params,
            seq.block_ids,
        )
        peer.sock.send(self.codec.encode(offer))

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
            if isinstance(msg, P.HelloReply):
                self.on_hello_reply(peer, msg)
            elif isinstance(msg, P.Rehello):  # the decode restarted: handshake, offer again
                peer.sock.send(peer.hello)
                if (lease := self.leases.get(msg.req_id)) is not None:
                    self.offer(peer, lease.seq)
            elif isinstance(msg, P.KVPull):
                self.send_blocks(peer, msg.req_id)
            elif isinstance(msg, P.KVRelease):
                if self.release(msg.req_id) and msg.num_bytes:
                    KV_BYTES_SENT.labels(self.id).inc(msg.num_bytes)
                    KV_TRANSPORT_BYTES.labels(self.id, peer.transport).inc(msg.num_bytes)
                    KV_TRANSFERS.labels(self.id).inc()
            elif isinstance(msg, P.KVAbort):
                if self.release(msg.req_id):
                    why = f"decode {peer.addr} aborted the hand-off: {msg.reason}"
                    self.fail(msg.req_id, why, retryable=True)

    def on_hello_reply(self, peer: DecodePeer, msg: P.HelloReply) -> None:
        if msg.ok:
            peer.refused, peer.transport = None, msg.transport
            log.info("decode %s takes our KV over %s", peer.addr, msg.transport)
        else:
            peer.refused = msg.reason
            log.error("decode %s REFUSED the KV handshake: %s", peer.addr, msg.reason)
        self.kv_peers.set(peer.addr, peer.transport if msg.ok else "refused")

    def send_blocks(self, peer: DecodePeer, req_id: str) -> None:
        lease = self.leases.get(req_id)
        if lease is None:  # aborted meanwhile: tell the decode, which holds reserved blocks
            peer.sock.send(self.codec.encode(P.KVAbort(req_id, "no longer held")))
            return
        runs, frames = block_frames(self.pool, lease.seq.block_ids)
        header = self.codec.encode(P.KVBlocks(req_id, runs))
        # copy=False: frames point into the pool; the lease keeps those blocks until release
        peer.sock.send_multipart([header, *frames], copy=False)

    def release(self, req_id: str) -> bool:
        lease = self.leases.pop(req_id, None)
        if lease is None:
            return False
        self.engine.kv_manager.free(lease.seq)
        return True

    def expire_leases(self) -> None:
        now = time.monotonic()
        for req_id, lease in list(self.leases.items()):
            if now - self.peers[lease.peer].last_seen > self.lease_s:
                log.warning("lease on %s expired: decode %s silent", req_id, lease.peer)
                LEASES_EXPIRED.labels(self.id).inc()
                self.release(req_id)
                self.fail(req_id, f"decode {lease.peer} stopped answering", retryable=True)

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
    probe: tuple[str, int] | None,
) -> None:
    segment = (
        shm.Segment(required=transport == "shm") if kind(transport) in ("auto", "shm") else None
    )
    engine = Engine.build(config, kv_storage=segment.create if segment else None)
    region = segment.region if segment else None
    service = PrefillService(engine, service_id, gateway_addr, transport, region)
    if probe:
        serve_probe(probe[1], service.status, probe[0])
    service.run_forever()  # exits after SIGTERM and a drain, unlinking the segment
