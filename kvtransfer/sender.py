"""The prefill's side of the KV hand-off, as plain state: no model, no sockets of its own.

    prefill: KVSender                              decode: KVReceiver (kvtransfer.receiver)
    route(req, decode)  when the request arrives
    Hello ---------------------------------------> once per pair; <- HelloReply
    on_chunk: KVOffer(final=False) --------------> reserve blocks, read what is new
    hand_off: KVOffer(final=True, + token 0) ----> read the rest
              <--------------------------------- KVPull (ZeroMQ): -> KVBlocks + frames
              <--------------------------------- KVRelease: the lease ends, pins freed
    KeepAlive both ways; KVAbort either way ends one hand-off (baton.protocol.HandoffEnd).

A lease pins every block offered (one extra reference each) until the decode's KVRelease or
expiry (nothing from that decode for `lease_s`; a lease whose request ended here expires
`lease_s` after it ended): whatever happens to the request here (finish, abort, preemption),
no read in flight sees a reused block.

The service feeds it messages and calls, and applies the `Stop`s it hands back (abort the
sequence, tell the gateway); it never edits the sender's state.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from baton import protocol as P
from baton.cache.block_pool import BlockPool
from baton.kvtransfer.base import InPart, Stop, Unreachable, valid_in_part
from baton.kvtransfer.metrics import (
    KV_BYTES_SENT,
    KV_EARLY_OFFERS,
    KV_TRANSFERS,
    KV_TRANSPORT_BYTES,
    LEASES_EXPIRED,
    KVPeers,
    count_end,
)
from baton.kvtransfer.zmq import block_frames
from baton.protocol import HandoffEnd
from baton.request import Sequence

log = logging.getLogger("baton.prefill")

# send(decode address, message, frames): frames follow the message as zero-copy parts
Send = Callable[[str, object, list], None]


@dataclass
class Lease:
    """Blocks pinned for one decode until it lets go of them."""

    peer: str  # the decode's KV address
    offer: P.KVOffer  # the latest, sent again to a decode that restarted
    pinned: list[int]
    ended_at: float | None = None  # the request ended here (finished or aborted): no error

    @property
    def ended(self) -> bool:
        return self.ended_at is not None


@dataclass
class DecodePeer:
    """A decode we hand off to; the handshake goes first, once."""

    addr: str
    last_seen: float
    awaiting_reply: bool = True  # a Hello is out: a second would read as our restart
    refused: str | None = None
    transport: str = ""  # the decode's choice, from its HelloReply


class KVSender:
    def __init__(
        self,
        service_id: str,
        hello: P.Hello,
        pool: BlockPool,
        pool_bytes: torch.Tensor,
        block_size: int,
        send: Send,
        lease_s: float = 60.0,  # a dead decode is caught sooner by the gateway, which aborts
        stream: bool = True,
        clock: Callable[[], float] = time.monotonic,
        forget: Callable[[str], None] = lambda addr: None,
    ):
        """pool: the blocks the leases pin; pool_bytes: the same pool as [num_blocks,
        block_nbytes] bytes, for ZeroMQ frames. stream: offer each chunk's full blocks.
        forget(addr): a decode is dropped (its socket can go)."""
        self.id, self.hello, self.pool, self.pool_bytes = service_id, hello, pool, pool_bytes
        self.block_size, self._send, self.lease_s = block_size, send, lease_s
        self.stream, self.clock, self._forget = stream, clock, forget
        self.routes: dict[str, str] = {}  # req_id -> decode address, until handed off
        self.leases: dict[str, Lease] = {}
        self.peers: dict[str, DecodePeer] = {}
        self.kv_peers = KVPeers(service_id, hello.transport)
        self._stops: list[Stop] = []

    # --- what the service calls ----------------------------------------------------------
    def route(self, req_id: str, decode_addr: str) -> None:
        """`req_id` goes to the decode at `decode_addr` once its prompt is computed."""
        self.routes[req_id] = decode_addr

    def on_chunk(self, seq: Sequence) -> None:
        """Offer the full blocks a chunk completed, while the rest of the prompt computes."""
        addr, lease = self.routes.get(seq.req_id), self.leases.get(seq.req_id)
        full = seq.num_computed_tokens // self.block_size
        if self.stream and addr and full > (len(lease.offer.block_ids) if lease else 0):
            if self._offer(addr, seq, full * self.block_size, final=False):
                KV_EARLY_OFFERS.labels(self.id).inc()

    def hand_off(self, seq: Sequence, finished: bool) -> bool:
        """Token 0 is out: offer the whole prompt. True: the decode takes it from here (the
        sequence leaves this service, its blocks pinned by the lease)."""
        addr = self.routes.pop(seq.req_id, None)
        if addr is None:
            return False
        if finished:  # nothing to hand off (a decode it was streamed to lets go)
            self.end(seq.req_id, "finished at its first token")
            return False
        return self._offer(addr, seq, seq.num_computed_tokens, final=True)

    def end(self, req_id: str, why: str) -> None:
        """The request ended here (the gateway ended it, or it finished): its decode lets go
        of what was offered, with no error."""
        self.routes.pop(req_id, None)
        if (lease := self.leases.get(req_id)) is not None and not lease.ended:
            lease.ended_at = self.clock()
            self._send(lease.peer, P.KVAbort(req_id, why, HandoffEnd.ABORTED), [])

    def on_message(self, addr: str, msg: P.DecodeToPrefill) -> None:
        peer = self.peers.get(addr)
        if peer is None:
            return  # we never spoke to it
        peer.last_seen = self.clock()
        lease = self.leases.get(getattr(msg, "req_id", ""))
        if lease is not None and lease.peer != addr:
            lease = None  # only the decode it was offered to speaks for it
        if isinstance(msg, P.HelloReply):
            self._on_hello_reply(peer, msg)
        elif isinstance(msg, P.Rehello):  # the decode restarted: handshake, offer again
            if not peer.awaiting_reply:
                self._say_hello(peer)
            if lease is not None and not lease.ended:
                self._send(addr, lease.offer, [])
        elif isinstance(msg, P.KVPull):
            self._send_blocks(addr, msg, lease)
        elif isinstance(msg, P.KVRelease) and lease is not None:
            if self.routes.pop(msg.req_id, None) is not None:
                self._stops.append(Stop(msg.req_id, None))  # it gave up mid-prefill
            # bytes landed: the decode took it; none: it let go (it reports why, if it failed)
            taken = msg.num_bytes > 0 and not lease.ended
            self._release(msg.req_id, HandoffEnd.FINISHED if taken else HandoffEnd.ABORTED)
            if msg.num_bytes:
                KV_BYTES_SENT.labels(self.id).inc(msg.num_bytes)
                KV_TRANSPORT_BYTES.labels(self.id, peer.transport).inc(msg.num_bytes)
                KV_TRANSFERS.labels(self.id).inc()
        elif isinstance(msg, P.KVAbort) and lease is not None:
            why = f"decode {addr} aborted the hand-off: {msg.reason}"
            self._end_lease(msg.req_id, why, HandoffEnd.FAILED)

    def expire(self) -> None:
        """End the leases of decodes silent for `lease_s`, and of requests ended that long ago
        (a decode that never knew of one would keep it alive with its keep-alives)."""
        now = self.clock()
        for req_id, lease in list(self.leases.items()):
            since = lease.ended_at if lease.ended else self.peers[lease.peer].last_seen
            if now - since > self.lease_s:
                log.warning("lease on %s expired: decode %s silent", req_id, lease.peer)
                LEASES_EXPIRED.labels(self.id).inc()
                why = f"decode {lease.peer} stopped answering"
                self._end_lease(req_id, why, HandoffEnd.EXPIRED)

    def keepalive(self) -> None:
        """Tells the decodes we are alive while they wait to pull. A decode silent for a lease
        with nothing leased to it is gone (scaled down, or restarted on another port) and is
        forgotten first: keep-alives to it would only fill its socket's queue."""
        now = self.clock()
        leased = {lease.peer for lease in self.leases.values()}
        for addr, peer in list(self.peers.items()):
            if addr not in leased and now - peer.last_seen > self.lease_s:
                log.info("decode %s silent for %.0f s: forgotten", addr, now - peer.last_seen)
                del self.peers[addr]
                self.kv_peers.set(addr, None)
                self._forget(addr)
        for addr in self.peers:
            self._send(addr, P.KeepAlive(), [])

    def stops(self) -> list[Stop]:
        """The requests to stop since the last call, each once."""
        stops, self._stops = self._stops, []
        return stops

    def holds_work(self) -> bool:
        return bool(self.leases or self.routes)

    # --- the protocol ----------------------------------------------------------------------
    def _peer(self, addr: str) -> DecodePeer:
        if addr not in self.peers:
            peer = DecodePeer(addr, self.clock())
            self._say_hello(peer)  # may raise Unreachable: then the peer is not kept
            self.peers[addr] = peer
        return self.peers[addr]

    def _say_hello(self, peer: DecodePeer) -> None:
        """Once until the decode answers: a restarted decode asks again (Rehello) for each
        offer it gets, and a second Hello would read to it as a second restart."""
        peer.awaiting_reply = True
        self._send(peer.addr, self.hello, [])

    def _on_hello_reply(self, peer: DecodePeer, msg: P.HelloReply) -> None:
        peer.awaiting_reply = False
        if msg.ok:
            peer.refused, peer.transport = None, msg.transport
            log.info("decode %s takes our KV over %s", peer.addr, msg.transport)
        else:
            peer.refused = msg.reason
            log.error("decode %s REFUSED the KV handshake: %s", peer.addr, msg.reason)
        self.kv_peers.set(peer.addr, peer.transport if msg.ok else "refused")

    def _offer(self, addr: str, seq: Sequence, num_computed: int, final: bool) -> bool:
        """Offer `seq`'s KV up to `num_computed` to the decode at `addr`, pinning its blocks
        under the lease; False if that decode cannot take it (the request stops here)."""
        try:
            peer = self._peer(addr)
        except Unreachable as e:  # an address no socket can connect to: fail this one only
            return self._fail(seq.req_id, f"cannot connect to decode {addr!r}: {e}", True)
        if peer.refused:
            why = f"decode {addr} refused the KV layout: {peer.refused}"
            return self._fail(seq.req_id, why, False)
        ids = seq.block_ids[: -(-num_computed // self.block_size)]
        if (lease := self.leases.get(seq.req_id)) is not None:
            # after a preemption the prompt's first blocks are computed again into new ones;
            # the decode has (or is reading) the pinned ones, whose KV is the same
            ids = lease.offer.block_ids + ids[len(lease.offer.block_ids) :]
        offer = P.KVOffer(
            seq.req_id, seq.token_ids, seq.num_prompt_tokens, num_computed, seq.params, ids, final
        )
        lease = self.leases.setdefault(seq.req_id, Lease(addr, offer, []))
        for b in ids[len(lease.pinned) :]:
            self.pool.share(b)
            lease.pinned.append(b)
        lease.offer = offer
        self._send(addr, offer, [])
        return True

    def _send_blocks(self, addr: str, pull: P.KVPull, lease: Lease | None) -> None:
        """`lease`: the pull's, where `addr` holds it; another decode that learned the req_id
        gets nothing (reliability review L10)."""
        if lease is None or lease.ended or not set(pull.block_ids) <= set(lease.pinned):
            # gone meanwhile (or never offered): tell the decode, which holds reserved blocks
            self._send(addr, P.KVAbort(pull.req_id, "no longer held"), [])
            return
        in_part = None
        if pull.num_in_part:
            in_part = InPart(pull.num_in_part, tuple(map(tuple, pull.ranges)))
            layers, block_nbytes = self.hello.layout.num_layers, self.pool_bytes.shape[1]
            if not valid_in_part(in_part, len(pull.block_ids), block_nbytes, layers):
                self._send(addr, P.KVAbort(pull.req_id, "a pull with bad ranges"), [])
                return
        runs, frames = block_frames(self.pool_bytes, pull.block_ids, in_part)
        # frames point into the pool; the pins keep those blocks until the release
        self._send(addr, P.KVBlocks(pull.req_id, runs), frames)

    def _fail(self, req_id: str, why: str, retryable: bool) -> bool:
        """The hand-off of a request still here cannot happen: free it and stop it."""
        self.routes.pop(req_id, None)
        self._release(req_id, HandoffEnd.FAILED)
        self._stops.append(Stop(req_id, why, retryable))
        return False

    def _end_lease(self, req_id: str, why: str, end: HandoffEnd) -> None:
        """The decode gave up (or went silent): free the pins, and stop the request if it is
        still alive, so the gateway can resume it elsewhere."""
        if self.leases[req_id].ended:
            self._release(req_id, HandoffEnd.ABORTED)
        else:
            self.routes.pop(req_id, None)
            self._release(req_id, end)
            self._stops.append(Stop(req_id, why, True))

    def _release(self, req_id: str, end: HandoffEnd) -> None:
        lease = self.leases.pop(req_id, None)
        if lease is not None:
            self.pool.release(lease.pinned)
            count_end(self.id, end)
