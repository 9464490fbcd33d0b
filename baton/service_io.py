"""What the prefill and decode services share: the loop itself (ServiceLoop) and its metrics
(the links it speaks through: service_links.py)."""

import atexit
import logging
import os
import signal
import threading
import time
import weakref
from typing import ClassVar

import msgspec
import torch
import zmq
from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from baton import protocol as P
from baton.engine import Engine
from baton.kvtransfer.base import Stop
from baton.kvtransfer.metrics import KVPeers
from baton.logs import ThrottledLog
from baton.plane import Keys
from baton.request import Sequence
from baton.scheduler import SampledToken, ScheduledSeq
from baton.service_links import HEARTBEAT_S, STALL_S, Every, GatewayLink, Heartbeats
from baton.slo import PromptPacer, StepTimes

log = logging.getLogger(__name__)

KEEPALIVE_S = 1.0  # between KV peers; renews leases
CACHE_EVENTS_S = 0.1  # the prefix cache's changes go to the gateway this often, at most
RESYNC_WAIT_S = 1.0  # after a batch the gateway could not take, the snapshot waits this long

KV_BLOCKS_USED = Gauge("baton_kv_blocks_used", "KV blocks held", ["service"])
KV_BLOCKS_TOTAL = Gauge("baton_kv_blocks_total", "KV blocks in the pool", ["service"])
RECOMPUTES = Counter("baton_recomputes", "sequences preempted and recomputed", ["service"])
PREFIX_HITS = Counter(
    "baton_prefix_cache_hit_tokens",
    "prompt tokens whose KV came from the prefix cache",
    ["service"],
)
REQUEST_ERRORS = Counter("baton_request_errors", "requests failed by this service", ["service"])
LOCAL_PREFILLS = Counter("baton_local_prefills", "prompts prefilled on a decode", ["service"])
BATCH_CAP = Gauge("baton_decode_batch_cap", "decode batch cap from the TPOT target", ["service"])
BAD_MESSAGES = Counter("baton_bad_messages", "malformed messages dropped", ["service"])


class TierMetrics(Collector):
    """The KV tier's and the sessions' figures, read from each live loop at every scrape."""

    COUNTERS: ClassVar = {  # TierStats field -> (metric, help)
        "read_bytes": ("baton_kv_tier_read_bytes", "bytes read back from the KV tier"),
        "written_bytes": ("baton_kv_tier_written_bytes", "bytes written to the KV tier"),
        "corrupt_files": ("baton_kv_tier_corrupt_files", "torn or foreign tier files deleted"),
        "dropped_writes": (
            "baton_kv_tier_dropped_writes",
            "evictions not kept: no room (the write queue, or RAM alone)",
        ),
        "deleted_files": ("baton_kv_tier_deleted_files", "tier files deleted over the size cap"),
    }

    def __init__(self):
        self.loops: weakref.WeakSet[ServiceLoop] = weakref.WeakSet()

    def collect(self):
        def family(kind, name, doc, value_of):
            metric = kind(name, doc, labels=["service"])
            for loop in list(self.loops):
                metric.add_metric([loop.id], value_of(loop))
            return metric

        def per_tier(kind, name, doc, value_of):  # one sample per tier of each chain
            metric = kind(name, doc, labels=["service", "tier"])
            for loop in list(self.loops):
                for level in loop.sched.kv.tier.levels if loop.sched.kv.tier else []:
                    metric.add_metric([loop.id, level.name], value_of(level))
            return metric

        yield family(
            CounterMetricFamily, "baton_kv_tier_hit_tokens", "prompt tokens whose KV the tier gave",
            lambda loop: loop.sched.num_tier_hit_tokens,
        )  # fmt: skip
        yield family(
            GaugeMetricFamily, "baton_kv_retained_blocks", "cached blocks kept for live sessions",
            lambda loop: loop.sched.kv.pool.num_retained,
        )  # fmt: skip
        yield per_tier(
            GaugeMetricFamily, "baton_kv_tier_bytes", "bytes the KV tier holds",
            lambda level: level.size_bytes,
        )  # fmt: skip
        for field, (name, doc) in self.COUNTERS.items():
            yield per_tier(
                CounterMetricFamily, name, doc, lambda level, f=field: getattr(level.stats, f)
            )


TIER_METRICS = TierMetrics()
REGISTRY.register(TIER_METRICS)


class ServiceLoop:
    """The loop both services run: drain the sockets -> one engine step -> hand each sampled
    token to `on_token` -> housekeeping -> heartbeat. Subclasses say which sockets to wait
    on, how to drain them, what a token means to them, and what their load is."""

    role: P.Role
    kv_addr = ""  # where prefills connect (decode only)
    kv_peers: KVPeers

    def __init__(
        self,
        engine: Engine,
        service_id: str,
        gateway_addr: str,
        tpot_s: float | None = None,
        keys: Keys | None = None,
    ):
        """keys: the service plane's (baton.plane); None: plain sockets."""
        self.engine, self.id, self.keys = engine, service_id, keys
        self.sched = engine.scheduler(hands_off=self.role is P.Role.PREFILL)
        self.ctx = zmq.Context()
        codec = P.Codec(P.ToService, self.count_bad)
        self.gateway = GatewayLink(self.ctx, gateway_addr, service_id, codec, keys, self.role)
        self.gateway_addr = gateway_addr
        self.snapshots = Every(HEARTBEAT_S)
        self.cache_batches = Every(CACHE_EVENTS_S)
        self.keepalives = Every(KEEPALIVE_S)
        self.refits = Every(KEEPALIVE_S)  # decode_fit's
        self.last_tick = time.monotonic()
        self.step_times = StepTimes()
        # Prompt tokens beside decoding sequences (a decode's stolen prompts, a prefill's
        # kept requests) are paced to the TPOT target (baton.slo.PromptPacer), from the fit
        # of pure decode steps
        self.tpot_s = tpot_s
        self.decode_times = StepTimes()  # seconds ~= fixed + per_seq x batch
        self.decode_fit: tuple[float, float] | None = None  # refreshed each keepalive period
        self.pacer = PromptPacer(tpot_s)
        self.draining = False
        self.requests_seen = 0  # PrefillRequests received (Load.requests_seen)
        self.prefix_hits_seen = 0
        self.load_changed = False  # report the load now, not at the next period
        self.heartbeat: P.Heartbeat | None = None  # the loop's latest snapshot
        self.health: dict = {}  # /health's body, taken with it
        # a probe asks the loop for a fresh snapshot and waits for it (a while, at most)
        self.health_asked, self.health_taken = threading.Event(), threading.Event()
        self.incarnation = f"{os.getpid()}-{time.time_ns()}"
        self.bad_log = ThrottledLog(log)  # what any peer can send us: counted, seldom logged
        KV_BLOCKS_TOTAL.labels(self.id).set(engine.kv_manager.pool.num_blocks)
        for counter in (REQUEST_ERRORS, RECOMPUTES, BAD_MESSAGES, PREFIX_HITS):  # from zero
            counter.labels(self.id)
        TIER_METRICS.loops.add(self)

    def run_forever(self, drain_s: float = 30.0) -> None:
        """Until SIGTERM, then drain: heartbeats say so at once (the gateway routes new work
        elsewhere), what is in flight finishes (up to `drain_s`), and the loop returns."""
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "draining", True))
        self.start_heartbeats()
        while not self.draining:
            self.step()
        log.info("draining: finishing what is in flight, taking nothing new")
        self.snapshot()
        self.heartbeater.wake.set()  # announce it now
        deadline = time.monotonic() + drain_s
        while (self.sched.has_work or self.holds_work()) and time.monotonic() < deadline:
            self.step()
        self.step()  # the messages of what just finished
        self.engine.close()  # the KV tier's queued writes
        log.info("drained; exiting")
        exit_now()

    def step(self) -> None:
        self.last_tick = time.monotonic()
        if not self.sched.has_work:
            zmq.select(self.sockets(), [], [], self.idle_wait_s())
        t0 = time.perf_counter()
        self.drain()
        batch = self.sched.schedule() if self.sched.has_work else []
        if batch:
            try:
                sampled = self.engine.runner.run(batch)
            except Exception as e:
                self.fail_batch(batch, e)
                batch, sampled = [], []
            finished = set(self.sched.postprocess(batch, sampled))
            for s, token in zip(batch, sampled, strict=True):
                if token is not None:
                    self.on_token(s.seq, token, s.seq in finished)
                else:
                    self.on_chunk(s.seq)
        elif self.sched.has_work:  # nothing fits until a peer frees blocks: wait, don't spin
            zmq.select(self.sockets(), [], [], self.idle_wait_s())
        self.housekeeping()
        self.publish_cache()
        self.pace_prompts()
        if self.snapshots.due() or self.load_changed or self.health_asked.is_set():
            self.snapshot()
            if self.load_changed:
                self.heartbeater.wake.set()
                self.load_changed = False
        KV_BLOCKS_USED.labels(self.id).set(self.engine.kv_manager.pool.num_used)
        if hits := self.sched.num_prefix_hit_tokens - self.prefix_hits_seen:
            PREFIX_HITS.labels(self.id).inc(hits)
            self.prefix_hits_seen = self.sched.num_prefix_hit_tokens
        # the whole iteration, not just the forward: what a queued token really waits
        self.observe_step(batch, time.perf_counter() - t0)

    def gateway_messages(self) -> list:
        """What the gateway sent; its asks for a snapshot of the prefix cache taken here."""
        out = []
        for msg in self.gateway.recv_all():
            if not isinstance(msg, P.CacheResync):
                out.append(msg)
            elif (events := self.sched.kv.events) is not None:
                events.resync()
        return out

    def publish_cache(self) -> None:
        """What the prefix cache gained and lost, for the gateway's index of it; a batch that
        cannot be sent makes the next one a snapshot, a second later (a gateway that takes
        nothing now is not sent one ten times a second)."""
        if not self.cache_batches.due():
            return
        if (batch := self.sched.kv.cache_events()) is not None and not self.gateway.send(batch):
            self.sched.kv.events.resync()
            self.cache_batches.next += RESYNC_WAIT_S

    def start_heartbeats(self) -> None:
        self.snapshot()
        self.heartbeater = Heartbeats(self.ctx, self.gateway_addr, self)
        self.heartbeater.start()

    def snapshot(self) -> None:
        """What the heartbeat thread sends next (taken here: the loop owns this state)."""
        load = self.measured_load()
        self.heartbeat = P.Heartbeat(
            self.id, self.role, self.kv_addr, load, self.incarnation, self.draining
        )
        self.health = {
            "service": self.id,
            "role": self.role,
            "load": msgspec.to_builtins(load),
            "kv": self.kv_peers.status(),
        }
        if self.health_asked.is_set():
            self.health_asked.clear()
            self.health_taken.set()

    def measured_load(self) -> P.Load:
        fixed, per_unit = self.step_times.fit() or (0.0, 0.0)
        return msgspec.structs.replace(
            self.load(),
            step_fixed_s=fixed,
            step_per_unit_s=per_unit,
            step_budget=self.step_budget(),
            requests_seen=self.requests_seen,
            tier_capacity_blocks=tier.cap_files if (tier := self.sched.kv.tier) else 0,
            threads=torch.get_num_threads(),
        )

    def send_token(self, seq: Sequence, token: SampledToken, finished: bool) -> None:
        """Token `index` of the request, with its finish reason once it is the last."""
        lp = token.logprob
        self.gateway.send(
            P.TokenOutput(
                seq.req_id,
                seq.num_output_tokens - 1,
                token.token_id,
                seq.finish_reason if finished else None,
                lp.logprob if lp else None,
                lp.top if lp else None,
            )
        )

    def accept(self, msg: P.PrefillRequest) -> bool:
        """Queue a request to prefill here; a bad one fails at once with the reason."""
        self.requests_seen += 1
        seq = Sequence(
            msg.req_id, msg.token_ids, msg.params, num_prompt_tokens=msg.num_prompt_tokens
        )
        try:
            self.sched.add(seq)
        except ValueError as e:
            self.fail(msg.req_id, str(e))
            return False
        return True

    def apply(self, stops: list[Stop]) -> None:
        """Stop the requests whose KV hand-off ended them here (kvtransfer.base.Stop)."""
        for stop in stops:
            self.sched.abort(stop.req_id)
            if stop.why is not None:
                self.fail(stop.req_id, stop.why, stop.retryable)

    def fail_batch(self, batch: list[ScheduledSeq], e: Exception) -> None:
        """A step raised (a bug one input triggers, an allocation that failed): the requests
        in it fail, not retryable (failover would take them to the next service, and down it
        goes too), their blocks free; the service goes on with the rest."""
        log.exception("a step of %d requests failed; they fail, the service goes on", len(batch))
        why = f"the engine failed on a step holding this request ({type(e).__name__}: {e})"
        for s in batch:
            self.end_request(s.seq.req_id, why)

    def end_request(self, req_id: str, why: str) -> None:
        """End a request here with an error the gateway passes on (not retryable)."""
        self.apply([Stop(req_id, why, retryable=False)])

    def count_bad(self, e: Exception) -> None:
        """A malformed message was dropped (protocol.Codec.try_decode)."""
        BAD_MESSAGES.labels(self.id).inc()
        self.bad_log.warning("%s dropped a malformed message: %s", self.id, e)

    def fail(self, req_id: str, message: str, retryable: bool = False) -> None:
        REQUEST_ERRORS.labels(self.id).inc()
        self.gateway.send(P.RequestError(req_id, message, retryable))

    def status(self) -> tuple[bool, dict]:
        """/health: a snapshot the loop takes when asked (within an iteration; the latest
        one, at most HEARTBEAT_S old, if the loop is busy for longer). This runs on the
        probe's thread, which must not read the scheduler while the loop changes it: a
        "deque mutated during iteration" there failed a liveness probe (review L5)."""
        if self.heartbeat is None:
            return False, {"service": self.id, "status": "starting"}
        self.health_taken.clear()
        self.health_asked.set()
        self.health_taken.wait(HEARTBEAT_S)
        return time.monotonic() - self.last_tick < STALL_S, self.health

    # --- what each service fills in -----------------------------------------------------
    def sockets(self) -> list[zmq.Socket]:
        raise NotImplementedError

    def drain(self) -> None:
        raise NotImplementedError

    def on_token(self, seq: Sequence, token: SampledToken, finished: bool) -> None:
        raise NotImplementedError

    def on_chunk(self, seq: Sequence) -> None:
        """A prompt advanced by a chunk and is not finished yet."""

    def idle_wait_s(self) -> float:
        """How long an idle loop waits for a message before looking around again; a read
        from the KV tier lands with no message to wake it: poll it often."""
        return 0.001 if self.sched.loading else 0.05

    def housekeeping(self) -> None:
        raise NotImplementedError

    def step_units(self, batch: list[ScheduledSeq]) -> int:
        """What a step's time scales with (baton.slo's units)."""
        raise NotImplementedError

    def observe_step(self, batch: list[ScheduledSeq], seconds: float) -> None:
        """A step's measured time: what the load's step-time model is fitted to, and the
        pacer's (a pure decode step, or what its prompt tokens added to one)."""
        self.step_times.observe(self.step_units(batch) if batch else 0, seconds)
        prompt = [s for s in batch if s.num_new_tokens > 1 or not s.samples]
        decoding = len(batch) - len(prompt)
        if batch and not prompt and self.decode_times is not self.step_times:
            self.decode_times.observe(decoding, seconds)
        if batch:
            tokens = sum(s.num_new_tokens for s in prompt)
            self.pacer.observe(self.decode_fit, decoding, tokens, seconds)

    def pace_prompts(self) -> None:
        if self.refits.due():
            self.decode_fit = self.decode_times.fit()
        self.sched.prompt_cap = self.pacer.cap(
            self.sched.num_decoding(), self.sched.max_num_batched_tokens
        )

    def step_budget(self) -> int:
        """The units one step can take."""
        raise NotImplementedError

    def load(self) -> P.Load:
        raise NotImplementedError

    def holds_work(self) -> bool:
        """Work outside the scheduler that a drain must wait for (leases, pending pulls)."""
        raise NotImplementedError


def exit_now() -> None:
    """Leave without waiting on library threads (UCX/NIXL teardown can block at interpreter
    exit); our own exit handlers (the shared KV segment's unlink) still run."""
    atexit._run_exitfuncs()
    logging.shutdown()
    os._exit(0)
