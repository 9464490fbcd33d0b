"""The prefill service: one process, one loop.

drain the gateway and decode sockets -> schedule a token budget (chunked prefill, prefix
cache) -> one forward -> send each finished prompt's first token to the gateway at once ->
offer its KV blocks to the chosen decode.

A request sent with no decode is kept: it decodes here, its prompts' chunks paced to the TPOT
target beside it (ServiceLoop.pace_prompts), while every decode is full (gateway/router.py).

The hand-off is PULL (the decode reads) and lives in kvtransfer.sender: offers under leases,
pulls, releases, aborts and expiry. This service owns the sockets and the scheduler and
applies what the sender says. Decode memory is never held while a prompt waits in this
queue. Streaming (`stream_kv`): a prompt prefilled in several chunks is offered after each
chunk, so the decode copies it while the next chunks compute.

The bytes move over the transport the decode chose at the handshake (kvtransfer.handshake):
sent as frames on KVPull (ZeroMQ), or read by the decode itself from this pool (shm: the pool
lives in /dev/shm; NIXL: the pool is registered with this process's agent).
"""

import logging
import os

import zmq

from baton import protocol as P
from baton.config import EngineConfig
from baton.engine import Engine
from baton.kvtransfer import nixl, shm
from baton.kvtransfer.base import Unreachable
from baton.kvtransfer.handshake import kind, start_nixl
from baton.kvtransfer.sender import KVSender
from baton.plane import Keys
from baton.probe import Probe
from baton.request import Sequence
from baton.scheduler import SampledToken, ScheduledSeq
from baton.service_io import ServiceLoop
from baton.service_links import on_this_host, send_nowait

log = logging.getLogger("baton.prefill")


class PrefillService(ServiceLoop):
    role = P.Role.PREFILL

    def __init__(
        self,
        engine: Engine,
        service_id: str,
        gateway_addr: str,
        transport: str = "zmq-tcp",
        shm_region: P.ShmRegion | None = None,
        lease_s: float = 60.0,
        stream_kv: bool = True,
        tpot_s: float | None = None,
        keys: Keys | None = None,
    ):
        """shm_region: where the pool lives when it is in shared memory (kvtransfer.shm)."""
        super().__init__(engine, service_id, gateway_addr, tpot_s, keys)
        pool = engine.kv.block_bytes()
        agent = start_nixl(transport, f"{service_id}-{os.getpid()}", pool)
        hello = P.Hello(
            service_id,
            engine.layout(),
            pool.shape[0],
            transport,
            shm_region,
            agent.region if agent else None,
        )
        self.nixl = agent  # decodes read through it: it lives as long as the service
        self.codec = P.Codec(P.DecodeToPrefill, self.count_bad)
        self.socks: dict[str, zmq.Socket] = {}  # a DEALER to each decode's KV socket
        kv = engine.kv_manager
        self.sender = KVSender(
            service_id, hello, kv.pool, pool, kv.block_size, self.send_kv, lease_s, stream_kv,
            forget=self.forget_kv,
        )  # fmt: skip
        self.kv_peers = self.sender.kv_peers
        if agent is not None:
            nixl.Progress(agent, self.remote_reads).start()

    def remote_reads(self) -> bool:
        """Whether a decode on another host may be reading our blocks (nixl.Progress answers
        it; on this host a read needs nothing of us). Called from that thread: a copy."""
        return any(not on_this_host(lease.peer) for lease in list(self.sender.leases.values()))

    def send_kv(self, addr: str, msg, frames: list) -> None:
        if addr not in self.socks:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, self.id.encode())
            sock.setsockopt(zmq.LINGER, 0)
            if self.keys is not None:
                self.keys.connect_as(sock, self.role, self.id)
            try:
                sock.connect(addr)
            except zmq.ZMQError as e:
                sock.close()
                raise Unreachable(str(e)) from e
            self.socks[addr] = sock
        # KVBlocks' frames go zero-copy (they point into the pool, pinned by the lease until
        # the release); a lone control message is small enough that copying is cheaper. A
        # decode that stops reading loses messages, never stalls this loop: its lease expires
        frames = [self.codec.encode(msg), *frames]
        send_nowait(self.socks[addr], frames, self.id, "decode", copy=len(frames) == 1)

    def forget_kv(self, addr: str) -> None:
        """The sender dropped a decode silent for a lease with nothing leased to it."""
        if (sock := self.socks.pop(addr, None)) is not None:
            sock.close(linger=0)

    def sockets(self) -> list[zmq.Socket]:
        return [self.gateway.sock, *self.socks.values()]

    def drain(self) -> None:
        for msg in self.gateway_messages():
            if isinstance(msg, P.PrefillRequest):
                # with no decode to hand it to, it is kept: decoded here, beside the prompts
                if self.accept(msg) and msg.decode_kv_addr:
                    self.sender.route(msg.req_id, msg.decode_kv_addr)
            elif isinstance(msg, P.Abort):
                self.sched.abort(msg.req_id)
                self.sender.end(msg.req_id, "aborted by the gateway")
        for addr, sock in list(self.socks.items()):
            while sock.poll(0):
                if (msg := self.codec.try_decode(sock.recv())) is not None:
                    self.sender.on_message(addr, msg)
        self.apply(self.sender.stops())

    def housekeeping(self) -> None:
        self.sender.expire()
        if self.keepalives.due():
            self.sender.keepalive()
        self.apply(self.sender.stops())

    def on_chunk(self, seq: Sequence) -> None:
        self.sender.on_chunk(seq)
        self.apply(self.sender.stops())

    def on_token(self, seq: Sequence, token: SampledToken, finished: bool) -> None:
        """Token 0 goes to the gateway now: TTFT never waits for the KV transfer. A kept
        request's next tokens go the same way."""
        self.send_token(seq, token, finished)
        if seq.num_output_tokens == 1:  # a prompt left the queue: admission should know now
            self.load_changed = True
        if self.sender.hand_off(seq, finished):
            self.sched.hand_off(seq)
        self.apply(self.sender.stops())

    def end_request(self, req_id: str, why: str) -> None:
        self.sender.end(req_id, why)  # what its decode was offered goes too
        super().end_request(req_id, why)

    def holds_work(self) -> bool:
        return self.sender.holds_work()

    def step_units(self, batch: list[ScheduledSeq]) -> int:
        """A prefill step's time scales with its prompt tokens."""
        return sum(s.num_new_tokens for s in batch)

    def step_budget(self) -> int:
        return self.sched.max_num_batched_tokens

    def load(self) -> P.Load:
        pool = self.engine.kv_manager.pool
        return P.Load(
            self.sched.queued_tokens(),
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
    tpot_s: float | None = None,
    keys: Keys | None = None,
) -> None:
    segment = (
        shm.Segment(required=transport == "shm") if kind(transport) in ("auto", "shm") else None
    )
    engine = Engine.build(config, kv_storage=segment.create if segment else None)
    region = segment.region if segment else None
    service = PrefillService(
        engine, service_id, gateway_addr, transport, region, stream_kv=stream_kv, tpot_s=tpot_s,
        keys=keys,
    )  # fmt: skip
    if probe:
        probe.status = service.status
    service.run_forever()  # exits after SIGTERM and a drain, unlinking the segment
