"""The decode service: one process, one loop.

drain the KV and gateway sockets -> reserve own blocks for offered requests and read their
KV -> one continuous-batching step over everything running -> stream each new token (with
its index) to the gateway.

Sequences join as their KV lands and leave when done, every step. When blocks run out the
scheduler preempts and the sequence is recomputed here (counted in baton_recomputes).

The hand-off lives in kvtransfer.receiver: each prefill peer gets a Reader at its Hello; an
offered request waits in the scheduler (WAITING_FOR_KV) until its blocks are reserved and its
KV has landed, polled each loop, never waited on. This service owns the sockets and applies
what the receiver says.
"""

import logging
import os
from functools import partial

import zmq

from baton import protocol as P
from baton.cache.kv_cache import full_layer_ranges
from baton.config import EngineConfig
from baton.engine import Engine
from baton.kvtransfer import shm
from baton.kvtransfer.base import Window
from baton.kvtransfer.handshake import choose, start_nixl
from baton.kvtransfer.receiver import KVReceiver
from baton.kvtransfer.zmq import ZmqReader
from baton.plane import Authenticator, Keys, may_speak_for, peer_key
from baton.probe import Probe
from baton.request import Sequence
from baton.scheduler import SampledToken, ScheduledSeq
from baton.service_io import BATCH_CAP, LOCAL_PREFILLS, RECOMPUTES, ServiceLoop
from baton.service_links import advertised, send_nowait
from baton.slo import max_batch_for_tpot

log = logging.getLogger("baton.decode")


def window(engine: Engine) -> Window | None:
    """What a hand-off to this decode may leave out: the KV its sliding-window layers no
    longer see (None: no layer slides)."""
    args, block_size = engine.model.args, engine.config.block_size
    if not args.sliding_window or not args.sliding_layers:
        return None
    return Window(
        args.sliding_window, block_size, full_layer_ranges(args, block_size, engine.kv.dtype)
    )


class DecodeService(ServiceLoop):
    role = P.Role.DECODE

    def __init__(
        self,
        engine: Engine,
        service_id: str,
        gateway_addr: str,
        kv_addr: str,
        transport: str = "zmq-tcp",
        transfer_timeout_s: float = 30.0,
        peer_timeout_s: float = 30.0,
        tpot_s: float | None = None,
        keys: Keys | None = None,
    ):
        super().__init__(engine, service_id, gateway_addr, tpot_s, keys)
        self.max_batch = self.sched.max_num_seqs
        self.decode_times = self.step_times  # its load's fit is of pure decode steps already
        self.kv_sock = self.ctx.socket(zmq.ROUTER)
        self.kv_sock.setsockopt(zmq.LINGER, 0)
        # the largest message: KVBlocks of the whole pool (its frames count one by one)
        self.kv_sock.setsockopt(zmq.MAXMSGSIZE, engine.kv.block_bytes().numel() + (1 << 20))
        self.authenticator = None
        if keys is not None:  # only prefills with a key of their role hand KV off here
            self.authenticator = Authenticator(self.ctx, keys)
            keys.serve(self.kv_sock)
        self.kv_sock.bind(kv_addr)
        self.kv_addr = advertised(self.kv_sock.getsockopt_string(zmq.LAST_ENDPOINT), gateway_addr)
        zmq_transport = "zmq-ipc" if self.kv_addr.startswith("ipc://") else "zmq-tcp"
        self.codec = P.Codec(P.PrefillToDecode, self.count_bad)
        pool = engine.kv.block_bytes()
        nixl = start_nixl(transport, f"{service_id}-{os.getpid()}", pool)

        def choose_reader(hello: P.Hello, send):
            return choose(
                hello, transport, pool, nixl, partial(ZmqReader, zmq_transport, send, pool)
            )

        self.receiver = KVReceiver(
            service_id,
            self.sched,
            engine.layout(),
            transport,
            choose_reader,
            self.send_kv,
            transfer_timeout_s,
            peer_timeout_s,
            on_bad=self.count_bad,
            window=window(engine),
        )
        self.kv_peers = self.receiver.kv_peers
        self.preemptions_seen = 0
        shm.sweep()  # segments of prefills that died while nobody watched

    def send_kv(self, peer_id: bytes, msg) -> None:
        send_nowait(self.kv_sock, [peer_id, self.codec.encode(msg)], self.id, "prefill")

    def sockets(self) -> list[zmq.Socket]:
        return [self.gateway.sock, self.kv_sock]

    def drain(self) -> None:
        for msg in self.gateway_messages():
            if isinstance(msg, P.Abort):
                if self.sched.abort(msg.req_id) is None:
                    self.receiver.abort(msg.req_id)
            elif isinstance(msg, P.PrefillRequest) and self.accept(msg):
                # a short prompt (or no prefill pool at all): cheaper here than a transfer;
                # its chunks mix into the decode steps, token 0 goes out like any other
                LOCAL_PREFILLS.labels(self.id).inc()
        while self.kv_sock.poll(0):
            identity, *frames = self.kv_sock.recv_multipart(copy=False)
            if not frames:
                self.count_bad(ValueError("an empty message"))
            elif self.keys is not None and not may_speak_for(
                key := peer_key(frames[0]), "prefill", identity.bytes.decode(errors="replace")
            ):
                self.count_bad(ValueError(f"a KV message from the {key} key"))
            elif (msg := self.codec.try_decode(frames[0].buffer)) is not None:
                self.receiver.on_message(identity.bytes, msg, [f.buffer for f in frames[1:]])
        self.receiver.pull()
        self.apply(self.receiver.stops())

    def on_token(self, seq: Sequence, token: SampledToken, finished: bool) -> None:
        self.send_token(seq, token, finished)

    def housekeeping(self) -> None:
        RECOMPUTES.labels(self.id).inc(self.sched.num_preemptions - self.preemptions_seen)
        self.preemptions_seen = self.sched.num_preemptions
        self.receiver.check_timeouts()
        if self.keepalives.due():
            self.receiver.keepalive()
            if self.tpot_s:  # the batch that keeps a step within the TPOT target
                # no guess from one batch size: a cap at that size would never see a larger one
                fit = self.step_times.fit(extrapolate=False)
                self.sched.max_num_seqs = max_batch_for_tpot(fit, self.tpot_s, self.max_batch)
                BATCH_CAP.labels(self.id).set(self.sched.max_num_seqs)
        self.apply(self.receiver.stops())

    def holds_work(self) -> bool:
        return self.receiver.holds_work

    def idle_wait_s(self) -> float:
        """A one-sided read (NIXL) lands with no message to wake the loop: poll it often."""
        return 0.001 if self.receiver.reading else super().idle_wait_s()

    def step_units(self, batch: list[ScheduledSeq]) -> int:
        """A decode step's time scales with its batch, counted only for pure decode steps (a
        prompt chunk would skew the line)."""
        tokens = sum(s.num_new_tokens for s in batch)
        return len(batch) if tokens == len(batch) else 0

    def step_budget(self) -> int:
        return self.sched.max_num_seqs

    def load(self) -> P.Load:
        pool = self.engine.kv_manager.pool
        return P.Load(
            self.receiver.queued_tokens,
            len(self.sched.running),
            pool.num_free,
            pool.num_blocks,
            ahead_tokens=self.sched.ahead_tokens(),
            chunk_tokens=self.sched.max_chunk_tokens,
            prompt_rate=self.pacer.rate(self.decode_fit, self.sched.num_decoding()),
            prompt_budget=self.sched.max_num_batched_tokens,
            prompt_token_s=self.pacer.per_token_s,
        )


def main(
    config: EngineConfig,
    transport: str,
    service_id: str,
    gateway_addr: str,
    kv_addr: str,
    probe: Probe | None,
    tpot_s: float | None = None,
    keys: Keys | None = None,
    peer_timeout_s: float = 30.0,
) -> None:
    service = DecodeService(
        Engine.build(config), service_id, gateway_addr, kv_addr, transport,
        peer_timeout_s=peer_timeout_s, tpot_s=tpot_s, keys=keys,
    )  # fmt: skip
    if probe:
        probe.status = service.status
    service.run_forever()
