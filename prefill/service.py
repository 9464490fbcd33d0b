"""The prefill service: one process, one loop.

drain the gateway and decode sockets -> schedule a token budget (chunked prefill, prefix
cache) -> one forward -> send each finished prompt's first token to the gateway at once ->
offer its KV blocks to the chosen decode.

Hand-off is PULL (decode reads): prefill offers the block ids and keeps the blocks under a
lease; the decode reserves its own blocks only when it can take the request, then pulls.
Decode memory is never held while a prompt waits in prefill's queue, and a block is freed only
on the decode's release, an abort, or lease expiry (no KeepAlive from that decode for
`lease_s`), so no in-flight transfer can see a reused block.
"""

import logging
import time
from dataclasses import dataclass

import msgspec
import zmq

from baton import protocol as P
from baton.engine import Engine
from baton.request import Sequence
from baton.service_io import (
    BAD_MESSAGES,
    KEEPALIVE_S,
    KV_BLOCKS_TOTAL,
    KV_BLOCKS_USED,
    KV_BYTES_SENT,
    KV_TRANSFERS,
    LEASES_EXPIRED,
    REQUEST_ERRORS,
    GatewayLink,
    serve_probe,
)
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
        self.sock.send(hello)


class PrefillService:
    def __init__(self, engine: Engine, service_id: str, gateway_addr: str, lease_s: float = 10.0):
        self.engine, self.id, self.lease_s = engine, service_id, lease_s
        self.sched = engine.scheduler()
        self.ctx = zmq.Context()
        self.gateway = GatewayLink(self.ctx, gateway_addr, service_id)
        self.codec = P.Codec(P.DecodeToPrefill)
        self.peers: dict[str, DecodePeer] = {}
        self.leases: dict[str, Lease] = {}
        self.routes: dict[str, str] = {}  # req_id -> decode kv addr, until handed off
        self.pool = engine.kv.block_bytes()
        self.last_tick = time.monotonic()
        self.next_keepalive = 0.0
        KV_BLOCKS_TOTAL.labels(self.id).set(engine.kv_manager.pool.num_blocks)

    # --- the loop ---------------------------------------------------------------------
    def run_forever(self) -> None:
        while True:
            self.step()

    def step(self) -> None:
        self.last_tick = time.monotonic()
        idle = not self.sched.has_work
        if idle:
            zmq.select([self.gateway.sock, *(p.sock for p in self.peers.values())], [], [], 0.05)
        for msg in self.gateway.recv_all():
            self.on_gateway(msg)
        for peer in list(self.peers.values()):
            self.drain_peer(peer)
        if self.sched.has_work:
            batch = self.sched.schedule()
            sampled = self.engine.runner.run(batch)
            finished = set(self.sched.postprocess(batch, sampled))
            for s, token in zip(batch, sampled, strict=True):
                if token is not None:
                    self.first_token(s.seq, token, s.seq in finished)
        self.expire_leases()
        self.keepalive()
        if self.gateway.heartbeat_due():
            self.gateway.send(self.heartbeat())
        KV_BLOCKS_USED.labels(self.id).set(self.engine.kv_manager.pool.num_used)

    # --- gateway messages ----------------------------------------------------------------
    def on_gateway(self, msg) -> None:
        if isinstance(msg, P.PrefillRequest):
            n = msg.num_prompt_tokens if msg.num_prompt_tokens >= 0 else len(msg.token_ids)
            seq = Sequence(msg.req_id, msg.token_ids, msg.params, num_prompt_tokens=n)
            try:
                self.sched.add(seq)
            except ValueError as e:
                self.fail(msg.req_id, str(e))
                return
            self.routes[msg.req_id] = msg.decode_kv_addr
        elif isinstance(msg, P.Abort):
            self.routes.pop(msg.req_id, None)
            if self.sched.abort(msg.req_id) is None:
                self.release(msg.req_id)

    def first_token(self, seq: Sequence, token, finished: bool) -> None:
        """Token 0 goes to the gateway now: TTFT never waits for the KV transfer."""
        lp = token.logprob
        reason = seq.finish_reason.openai if finished else None
        self.gateway.send(
            P.TokenOutput(
                seq.req_id,
                seq.num_output_tokens - 1,
                token.token_id,
                reason,
                lp.logprob if lp else None,
                lp.top if lp else None,
            )
        )
        addr = self.routes.pop(seq.req_id, None)
        if finished or addr is None:
            return
        self.sched.running.remove(seq)  # the blocks now belong to the lease
        peer = self.peer(addr)
        if peer.refused:
            self.engine.kv_manager.free(seq)
            self.fail(seq.req_id, f"decode {addr} refused the KV layout: {peer.refused}")
            return
        self.leases[seq.req_id] = Lease(seq, addr)
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
            hello = self.codec.encode(P.Hello(self.id, self.engine.layout()))
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
            if isinstance(msg, P.HelloReply) and not msg.ok:
                peer.refused = msg.reason
                log.error("decode %s REFUSED our KV layout: %s", peer.addr, msg.reason)
            elif isinstance(msg, P.KVPull):
                self.send_blocks(peer, msg.req_id)
            elif isinstance(msg, P.KVRelease):
                self.release(msg.req_id)
            elif isinstance(msg, P.KVAbort):
                if self.release(msg.req_id):
                    self.fail(msg.req_id, f"decode {peer.addr} aborted the hand-off: {msg.reason}")

    def keepalive(self) -> None:
        """Tells decodes we are alive while they wait to pull from us."""
        now = time.monotonic()
        if now < self.next_keepalive:
            return
        self.next_keepalive = now + KEEPALIVE_S
        for peer in self.peers.values():
            peer.sock.send(self.codec.encode(P.KeepAlive()))

    def send_blocks(self, peer: DecodePeer, req_id: str) -> None:
        lease = self.leases.get(req_id)
        if lease is None:  # aborted meanwhile: tell the decode, which holds reserved blocks
            peer.sock.send(self.codec.encode(P.KVAbort(req_id, "no longer held")))
            return
        runs, frames = block_frames(self.pool, lease.seq.block_ids)
        header = self.codec.encode(P.KVBlocks(req_id, runs))
        # copy=False: frames point into the pool; the lease keeps those blocks until release
        peer.sock.send_multipart([header, *frames], copy=False)
        KV_BYTES_SENT.labels(self.id).inc(len(lease.seq.block_ids) * self.pool.shape[1])

    def release(self, req_id: str) -> bool:
        lease = self.leases.pop(req_id, None)
        if lease is None:
            return False
        self.engine.kv_manager.free(lease.seq)
        KV_TRANSFERS.labels(self.id).inc()
        return True

    def expire_leases(self) -> None:
        now = time.monotonic()
        for req_id, lease in list(self.leases.items()):
            if now - self.peers[lease.peer].last_seen > self.lease_s:
                log.warning("lease on %s expired: decode %s silent", req_id, lease.peer)
                LEASES_EXPIRED.labels(self.id).inc()
                self.release(req_id)
                self.fail(req_id, f"decode {lease.peer} stopped answering")

    # --- reporting ---------------------------------------------------------------------
    def fail(self, req_id: str, message: str) -> None:
        REQUEST_ERRORS.labels(self.id).inc()
        self.gateway.send(P.RequestError(req_id, message))

    def load(self) -> P.Load:
        pool = self.engine.kv_manager.pool
        queued = sum(
            s.num_tokens - s.num_computed_tokens for s in (*self.sched.waiting, *self.sched.running)
        )
        return P.Load(queued, len(self.sched.running), pool.num_free, pool.num_blocks)

    def heartbeat(self) -> P.Heartbeat:
        return P.Heartbeat(self.id, "prefill", "", "", self.load())

    def status(self) -> tuple[bool, dict]:
        ok = time.monotonic() - self.last_tick < 30
        return ok, {"service": self.id, "role": "prefill", "load": msgspec.to_builtins(self.load())}


def main(engine: Engine, service_id: str, gateway_addr: str, http_port: int | None) -> None:
    service = PrefillService(engine, service_id, gateway_addr)
    if http_port:
        serve_probe(http_port, service.status)
    service.run_forever()
