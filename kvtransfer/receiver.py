"""The decode's side of the KV hand-off, as plain state: no model, no sockets of its own.

Each prefill peer gets a Reader at its Hello (kvtransfer.handshake picks the transport). An
offered request waits in the scheduler as WAITING_FOR_KV; `pull` asks the scheduler to reserve
its blocks (whole, under the scheduler's headroom rule; the leading ones this decode's prefix
cache holds are shared instead, and never read) and starts a read of what is new,
one read in flight per request; when the final offer's blocks have all landed the request
joins the scheduler's queue and the prefill gets KVRelease. Every other ending (KVAbort,
the gateway's Abort, a failed or stuck read, a silent or restarted prefill) returns the
blocks to the pool once no transfer can write them, answers KVRelease, and hands the service
a `Stop` when the request failed. The sender's half is kvtransfer.sender.
"""

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from baton import protocol as P
from baton.kvtransfer import shm
from baton.kvtransfer.base import InPart, Landed, Reader, Stop, TransferError, Window
from baton.kvtransfer.handshake import Refused
from baton.kvtransfer.metrics import (
    KV_BYTES_RECEIVED,
    KV_TRANSPORT_BYTES,
    KV_TRANSPORT_RUNS,
    KVPeers,
    count_end,
)
from baton.kvtransfer.zmq import ZmqReader
from baton.protocol import HandoffEnd
from baton.request import Sequence
from baton.scheduler import Scheduler

log = logging.getLogger("baton.decode")

# send(prefill's socket identity, message)
Send = Callable[[bytes, object], None]
# the reader for a prefill's Hello (kvtransfer.handshake.choose), given how to send to it;
# with why each transport tried before it was skipped; raises Refused
ChooseReader = Callable[[P.Hello, Callable[[object], None]], tuple[Reader, list[str]]]
MAX_ENDED = 4096  # hand-offs ended here, remembered for offers still on their way...
ENDED_S = 30.0  # ...for this long at least


@dataclass
class Pending:
    """An offered request whose KV has not all landed yet."""

    seq: Sequence  # its blocks are reserved at its first read, for all of its KV
    peer: bytes  # the prefill's socket identity
    num_computed: int  # tokens the latest offer covers
    src_block_ids: list[int]  # the prefill's blocks holding them
    final: bool  # the prefill is done: no more offers
    num_started: int = 0  # leading blocks whose read started
    reading_since: float | None = None  # a read is in flight
    num_bytes: int = 0  # landed so far

    @property
    def unread(self) -> int:
        return len(self.src_block_ids) - self.num_started


@dataclass
class PrefillPeer:
    """A prefill that said Hello, and how we read from it (None: we refused it)."""

    prefill_id: str
    num_blocks: int
    last_seen: float
    reader: Reader | None
    refused: str = ""


class KVReceiver:
    def __init__(
        self,
        service_id: str,
        sched: Scheduler,
        layout: P.KVLayout,
        transport: str,
        choose_reader: ChooseReader,
        send: Send,
        # a read with no answer; a prefill that died is usually caught sooner by the gateway
        # (heartbeats), which aborts its requests here
        transfer_timeout_s: float = 30.0,
        peer_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_bad: Callable[[Exception], None] = lambda e: None,
        window: Window | None = None,
    ):
        """on_bad: hears of each message dropped as malformed (the service counts them);
        window: the model's sliding-window layers, whose KV behind the window is not read."""
        self.id, self.sched, self.layout, self.window = service_id, sched, layout, window
        self.choose_reader, self._send, self.clock, self.on_bad = choose_reader, send, clock, on_bad
        self.transfer_timeout_s, self.peer_timeout_s = transfer_timeout_s, peer_timeout_s
        self.pending: dict[str, Pending] = {}
        self.peers: dict[bytes, PrefillPeer] = {}
        self.kv_peers = KVPeers(service_id, transport)
        # req_id -> when its hand-off ended here (or the gateway aborted it before any offer
        # came): a later offer of it, sent before the prefill heard, is let go (bounded, expiring)
        self.ended: OrderedDict[str, float] = OrderedDict()
        # req_id -> a sequence whose read could not be stopped, and its reader: its blocks go
        # back once poll() reports the read ended (a forgotten peer's reader is polled too)
        self.stuck: dict[str, tuple[Sequence, Reader]] = {}
        self._stops: list[Stop] = []

    # --- messages --------------------------------------------------------------------------
    def on_message(self, peer_id: bytes, msg: P.PrefillToDecode, frames: list) -> None:
        """A message from a prefill; `frames`: the parts after it (KVBlocks' bytes)."""
        if isinstance(msg, P.Hello):
            self._on_hello(peer_id, msg)
            return
        peer = self.peers.get(peer_id)
        if peer is None:  # we restarted, or forgot it: it must say Hello again
            if isinstance(msg, P.KVOffer):
                self._send(peer_id, P.Rehello(msg.req_id))
            elif isinstance(msg, P.KVAbort):  # we hold nothing of it: it may let go
                self._send(peer_id, P.KVRelease(msg.req_id))
            return
        peer.last_seen = self.clock()
        if isinstance(msg, P.KVOffer):
            self._on_offer(peer_id, peer, msg)
        elif isinstance(msg, P.KVBlocks) and isinstance(peer.reader, ZmqReader):
            peer.reader.receive(msg, frames)
        elif isinstance(msg, P.KVAbort):
            p = self.pending.get(msg.req_id)
            if p is not None and p.peer == peer_id:
                end = HandoffEnd.ABORTED if msg.end is HandoffEnd.ABORTED else HandoffEnd.FAILED
                self._end(msg.req_id, f"prefill aborted the hand-off: {msg.reason}", end)
            else:  # nothing of it here (any more): the prefill may let go of its blocks
                self._send(peer_id, P.KVRelease(msg.req_id))

    def _on_hello(self, peer_id: bytes, hello: P.Hello) -> None:
        """Choose how to read from this prefill, once; a second Hello is a restarted one."""
        if peer_id in self.peers:
            self.forget(peer_id, "restarted")
        reader, refused, skipped = None, "", []
        try:
            if hello.layout != self.layout:
                # the peer learns which fields differ, never our values (the log has them)
                log.error(
                    "prefill %s: KV layout %s != ours %s",
                    hello.prefill_id,
                    hello.layout,
                    self.layout,
                )
                fields = [f for f in self.layout.__struct_fields__
                          if getattr(hello.layout, f) != getattr(self.layout, f)]  # fmt: skip
                raise Refused(f"KV layout differs in {', '.join(fields)}")
            reader, skipped = self.choose_reader(hello, lambda m: self._send(peer_id, m))
        except Refused as e:
            refused = str(e)
            log.error("REFUSED prefill %s: %s", hello.prefill_id, refused)
        else:
            why = f" (skipped {'; '.join(skipped)})" if skipped else ""
            log.info("prefill %s: KV over %s%s", hello.prefill_id, reader.transport, why)
        self.peers[peer_id] = PrefillPeer(
            hello.prefill_id, hello.num_blocks, self.clock(), reader, refused
        )
        chosen = reader.transport if reader else ""
        self.kv_peers.set(hello.prefill_id, chosen or "refused")
        self._send(peer_id, P.HelloReply(reader is not None, refused, chosen))

    def _on_offer(self, peer_id: bytes, peer: PrefillPeer, offer: P.KVOffer) -> None:
        if peer.reader is None:
            self._send(peer_id, P.KVAbort(offer.req_id, f"handshake refused: {peer.refused}"))
            return
        p = self.pending.get(offer.req_id)
        if p is None and offer.req_id in self.ended:
            # it ended here (or the gateway's Abort overtook the offer): nothing may run it
            self._send(peer_id, P.KVRelease(offer.req_id))
            return
        if p is not None and (p.peer != peer_id or p.final):
            self.on_bad(ValueError(f"a repeated offer of {offer.req_id}"))  # it would orphan blocks
            return
        ids = offer.block_ids
        try:
            if not 0 <= offer.num_computed < len(offer.token_ids):  # the last token is ours
                raise ValueError(
                    f"bad KV offer: {offer.num_computed} of {len(offer.token_ids)} computed"
                )
            if len(ids) != self.sched.kv.blocks_needed(offer.num_computed) or (
                ids and not 0 <= min(ids) <= max(ids) < peer.num_blocks
            ):
                raise ValueError(f"bad KV offer: blocks {ids} for {offer.num_computed} tokens")
            if p is None:
                seq = Sequence(offer.req_id, offer.token_ids, offer.params, offer.num_prompt_tokens)
                self.sched.add_remote(seq)
                p = self.pending[offer.req_id] = Pending(seq, peer_id, 0, [], False)
            elif not p.num_started <= len(ids) <= len(p.seq.block_ids or ids):
                raise ValueError(f"bad KV offer: {len(ids)} blocks after {p.num_started} read")
            else:  # the final offer adds the first sampled token; what is checked will run
                self.sched.update_remote(p.seq, offer.token_ids, offer.params)
        except ValueError as e:
            if p is not None:
                self._end(offer.req_id, str(e))
            else:
                self._send(peer_id, P.KVRelease(offer.req_id))
                count_end(self.id, HandoffEnd.FAILED)
                self._stops.append(Stop(offer.req_id, str(e), retryable=False))
            return
        p.num_computed, p.src_block_ids, p.final = offer.num_computed, ids, offer.final

    # --- each loop ---------------------------------------------------------------------------
    def pull(self) -> None:
        """Take in the reads that landed; reserve blocks for offered requests, oldest first,
        and read what was offered into them; then take in those that landed at once (a
        shared-memory read copies as it starts), so they join before the next step."""
        self._poll()
        for req_id, p in list(self.pending.items()):
            if p.reading_since is not None:
                continue
            # all the KV it will hold: the prompt (a streamed offer's token_ids) or, once
            # final, what the prefill computed
            total = p.num_computed if p.final else p.seq.num_tokens
            if not self.sched.reserve_remote(p.seq, total):
                break
            # the leading blocks its own prefix cache held (shared at the reservation) stay
            p.num_started = max(p.num_started, min(p.seq.num_cached_blocks, len(p.src_block_ids)))
            # the leading blocks only its sliding layers' windows have left behind
            behind = self.window.blocks_behind(total) if self.window else 0
            if behind > p.num_started and not self.window.ranges:  # every layer slides
                p.num_started, p.seq.kv_in_part = min(behind, len(p.src_block_ids)), True
            if not p.unread:
                if p.final:  # nothing (more) to read
                    self._join(p)
                continue
            p.reading_since = self.clock()
            first, p.num_started = p.num_started, len(p.src_block_ids)
            peer = self.peers[p.peer]
            src, dst = p.src_block_ids[first:], p.seq.block_ids[first : p.num_started]
            in_part = None
            if (n := min(behind, p.num_started) - first) > 0:
                in_part, p.seq.kv_in_part = InPart(n, self.window.ranges), True
            try:
                peer.reader.start(req_id, src, dst, in_part)
            except TransferError as e:
                self._end(req_id, f"cannot read prefill {peer.prefill_id}: {e}")
        self._poll()

    def _poll(self) -> None:
        for peer in list(self.peers.values()):
            for landed in peer.reader.poll() if peer.reader else ():
                self._on_landed(peer, landed)
        leaving = {id(r): r for _, r in self.stuck.values()} if self.stuck else {}
        for reader in leaving.values():
            if all(reader is not p.reader for p in self.peers.values()):  # a forgotten peer's
                for landed in reader.poll():
                    self._read_ended(landed.req_id)
                if not self._reads_stuck(reader):
                    reader.close()  # its last stuck read ended

    def _reads_stuck(self, reader: Reader) -> bool:
        return any(reader is r for _, r in self.stuck.values())

    def _read_ended(self, req_id: str) -> None:
        """A read of a hand-off that had ended: its blocks are safe to free now."""
        if (stuck := self.stuck.pop(req_id, None)) is not None:
            self.sched.release_blocks(stuck[0])

    def _on_landed(self, peer: PrefillPeer, landed: Landed) -> None:
        p = self.pending.get(landed.req_id)
        if p is None:  # ended while in flight
            self._read_ended(landed.req_id)
            return
        if landed.error:
            self._end(landed.req_id, f"KV transfer from {peer.prefill_id} failed: {landed.error}")
            return
        p.reading_since, p.num_bytes = None, p.num_bytes + landed.num_bytes
        KV_BYTES_RECEIVED.labels(self.id).inc(landed.num_bytes)
        KV_TRANSPORT_BYTES.labels(self.id, peer.reader.transport).inc(landed.num_bytes)
        KV_TRANSPORT_RUNS.labels(self.id, peer.reader.transport).inc(landed.num_runs)
        if p.final and not p.unread:
            self._join(p)

    def _join(self, p: Pending) -> None:
        """All of its KV is here: it joins the scheduler's queue; the prefill lets go."""
        del self.pending[p.seq.req_id]
        self._send(p.peer, P.KVRelease(p.seq.req_id, p.num_bytes))
        self.sched.kv_landed(p.seq, p.num_computed)
        self._remember_end(p.seq.req_id)  # a late repeat of its offer must not run it twice
        count_end(self.id, HandoffEnd.FINISHED)

    # --- endings -----------------------------------------------------------------------------
    def abort(self, req_id: str) -> None:
        """The gateway ended the request: drop its hand-off, or remember the abort for an offer
        still on its way (an Abort may overtake it)."""
        if req_id in self.pending:
            self._end(req_id, "aborted by the gateway", HandoffEnd.ABORTED)
        else:
            self._remember_end(req_id)

    def _remember_end(self, req_id: str) -> None:
        self.ended.pop(req_id, None)  # to the back: the front expires first
        self.ended[req_id] = self.clock()
        while len(self.ended) > MAX_ENDED:
            self.ended.popitem(last=False)

    def _end(self, req_id: str, why: str, end: HandoffEnd = HandoffEnd.FAILED) -> None:
        """Drop a hand-off that will not join the batch: stop its read, free our blocks once
        nothing can write them, let the prefill free its own; a failed or expired one stops the
        request (retryable: the hand-off failed, not the request)."""
        p = self.pending.pop(req_id)
        reader = self.peers[p.peer].reader
        free = p.reading_since is None or reader is None or reader.cancel(req_id)
        if not free:  # a transfer we cannot stop may still write them: not until it ends
            log.info("the read into %s's blocks is still in flight: they wait for it", req_id)
            self.stuck[req_id] = (p.seq, reader)
        self.sched.drop_remote(p.seq, free)
        self._send(p.peer, P.KVRelease(req_id))
        self._remember_end(req_id)
        count_end(self.id, end)
        if end is not HandoffEnd.ABORTED:
            self._stops.append(Stop(req_id, why))

    def forget(self, peer_id: bytes, why: str) -> None:
        """A prefill left (silent, or restarted): fail what waits on it, stop reading it."""
        peer = self.peers[peer_id]
        for req_id in [r for r, p in self.pending.items() if p.peer == peer_id]:
            self._end(req_id, f"prefill {peer.prefill_id} {why}", HandoffEnd.EXPIRED)
        del self.peers[peer_id]
        if peer.reader is not None and not self._reads_stuck(peer.reader):
            peer.reader.close()  # else _poll polls it until its stuck reads end, then closes it
        self.kv_peers.set(peer.prefill_id, None)
        shm.sweep()  # a dead prefill's segment: nobody else may be left to unlink it

    def check_timeouts(self) -> None:
        """A read unanswered, or a prefill gone silent while we wait on it: fail fast."""
        now = self.clock()
        for req_id, p in list(self.pending.items()):
            peer = self.peers[p.peer]
            silent = now - peer.last_seen > self.peer_timeout_s
            stuck = p.reading_since is not None and now - p.reading_since > self.transfer_timeout_s
            if silent or stuck:
                why = "stopped answering" if silent else "did not send the KV in time"
                self._end(req_id, f"prefill {peer.prefill_id} {why}", HandoffEnd.EXPIRED)
        keep_s = max(self.peer_timeout_s, ENDED_S)
        while self.ended and now - next(iter(self.ended.values())) > keep_s:
            self.ended.popitem(last=False)

    def keepalive(self) -> None:
        """Renews the prefills' leases on blocks they hold for us; forgets silent ones."""
        now = self.clock()
        for peer_id, peer in list(self.peers.items()):
            if now - peer.last_seen > self.peer_timeout_s:
                self.forget(peer_id, "stopped answering")
            else:
                self._send(peer_id, P.KeepAlive())

    def stops(self) -> list[Stop]:
        """The requests to fail since the last call, each once."""
        stops, self._stops = self._stops, []
        return stops

    @property
    def holds_work(self) -> bool:
        return bool(self.pending)

    @property
    def reading(self) -> bool:
        return any(p.reading_since is not None for p in self.pending.values())

    @property
    def queued_tokens(self) -> int:
        return sum(p.num_computed for p in self.pending.values())
