"""A deployment under a workload, as a discrete-event simulation over a Profile (no torch).

What it models, after the real services:
- arrivals at the gateway: the in-flight limit, then (admission = "slo") baton.slo.admit on
  the least-loaded prefill with the step-time line that prefill has fitted so far, a miss
  answered 429; the decode is picked at arrival, the one with the fewest requests;
- a prefill: FIFO, each step up to `prefill_budget` prompt tokens across the queue, each prompt
  at most one chunk while others wait (baton.scheduler.chunk_cap);
  token 0 at the end of the step that finishes a prompt, then the KV hand-off;
- a decode: continuous batching, running sequences first, up to max_num_seqs lowered to
  what its own fitted step times say keeps a step within the TPOT target (as
  decode/service.py does); a prompt prefilled locally (aggregated, or short) mixes its
  chunks into the decode steps.
Not modelled: the KV pool's size (preemption), prefix-cache hits, the
gateway's TTFT calibration, heartbeat staleness, a prefill keeping requests to decode.

Each request comes out as a baton.bench RequestRecord, so `summarize` gives the same
figures `baton bench` reports, by the same definitions.
"""

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from baton.bench.metrics import SLO, RequestRecord, summarize
from baton.bench.workloads import Dist
from baton.config import BatonConfig
from baton.plan.profile import Profile, attention_pairs
from baton.scheduler import chunk_cap, tokens_ahead
from baton.slo import PromptPacer, StepTimes, admit, max_batch_for_tpot, prefill_seconds


@dataclass(frozen=True)
class Arrival:
    at_s: float
    prompt_tokens: int
    output_tokens: int


def poisson_arrivals(
    rate: float, input_len: Dist, output_len: Dist, num_requests: int, seed: int
) -> list[Arrival]:
    """Send times are the draw `baton bench --rate RATE --seed SEED` makes (gamma gaps of
    shape 1: Poisson), so a plan and a bench see the same arrivals."""
    gaps = np.random.default_rng(seed).gamma(1.0, 1 / rate, num_requests)
    times = np.concatenate([[0.0], np.cumsum(gaps[:-1])])
    rng = np.random.default_rng(seed)
    inputs = input_len.lengths(rng, num_requests)
    outputs = output_len.lengths(rng, num_requests)
    return [Arrival(float(t), i, o) for t, i, o in zip(times, inputs, outputs, strict=True)]


@dataclass(frozen=True)
class Deployment:
    """What the simulation needs of a BatonConfig (`from_config`; search.to_config writes
    one back)."""

    num_prefill: int  # 0: aggregated, every prompt prefills on its decode
    num_decode: int
    prefill_budget: int  # prompt tokens a prefill step takes
    decode_budget: int  # tokens a decode step takes: its decodes + local prompt chunks
    decode_max_batch: int
    prefill_chunk: int | None = None  # a prompt's tokens per step while others wait: None, half
    decode_chunk: int | None = None  # the budget (max_chunk_tokens; baton.scheduler.chunk_cap)
    local_prefill_tokens: int = 0
    busy_prefill_tokens: int = 0  # work stealing: gateway.busy_prefill_tokens
    max_inflight: int = 256
    admission_ttft_s: float | None = None  # slo admission's target; None: queue-limit only
    tpot_s: float | None = None  # the decode lowers its batch cap to meet it

    @classmethod
    def from_config(cls, config: BatonConfig) -> "Deployment":
        prefill, decode, gw = (
            config.engine_for("prefill"),
            config.engine_for("decode"),
            config.gateway,
        )
        return cls(
            num_prefill=config.prefill.count,
            num_decode=config.decode.count,
            prefill_budget=prefill.max_num_batched_tokens,
            decode_budget=decode.max_num_batched_tokens,
            decode_max_batch=decode.max_num_seqs,
            prefill_chunk=prefill.max_chunk_tokens,
            decode_chunk=decode.max_chunk_tokens,
            local_prefill_tokens=gw.local_prefill_tokens,
            busy_prefill_tokens=gw.busy_prefill_tokens,
            max_inflight=gw.max_queued_requests,
            admission_ttft_s=(
                gw.admission_margin * config.slo.ttft_ms / 1e3 if gw.admission == "slo" else None
            ),
            tpot_s=config.slo.tpot_ms / 1e3,
        )

    @property
    def split(self) -> str:
        return f"{self.num_prefill}:{self.num_decode}"

    @property
    def token_budget(self) -> int:
        """The budget that prompts are prefilled under."""
        return self.prefill_budget if self.num_prefill else self.decode_budget


@dataclass(eq=False)
class _Request:
    arrival: Arrival
    remaining: int  # prompt tokens not yet prefilled
    decode: "_Decode | None" = None
    num_output: int = 0  # tokens sampled so far
    first_s: float | None = None
    last_s: float | None = None
    rejected: bool = False
    prefilled_on_decode: bool = False

    @property
    def context(self) -> int:
        return self.arrival.prompt_tokens + self.num_output

    def chunk_pairs(self, n: int) -> int:
        """Attention pairs of its next `n` prompt tokens."""
        return attention_pairs(self.arrival.prompt_tokens - self.remaining, n)


class _Server:
    """A worker that runs one step at a time. `kick` starts the next step when idle, after
    whatever else happens at this instant: a service drains its whole inbox before it
    schedules."""

    def __init__(self, sim: "_Simulation"):
        self.sim = sim
        self.busy = False
        self.step_times = StepTimes()  # what the real service fits and reports

    def kick(self) -> None:
        if not self.busy:
            self.busy = True
            self.sim.at(self.sim.now, self.start)

    def start(self) -> None:
        work = self.schedule()
        if work is None:
            self.busy = False
            return
        seconds, done = work
        self.sim.at(self.sim.now + seconds, lambda: self.finish(done))

    def finish(self, done: Callable[[], None]) -> None:
        self.busy = False
        done()
        self.kick()

    def schedule(self) -> tuple[float, Callable[[], None]] | None:
        raise NotImplementedError


class _Prefill(_Server):
    def __init__(self, sim: "_Simulation"):
        super().__init__(sim)
        self.queue: deque[_Request] = deque()

    @property
    def queued_tokens(self) -> int:
        return sum(r.remaining for r in self.queue)

    @property
    def ahead_tokens(self) -> int:
        cap = chunk_cap(self.budget, self.sim.deployment.prefill_chunk, 2)
        return tokens_ahead([r.remaining for r in self.queue], self.budget, cap)

    @property
    def budget(self) -> int:
        return self.sim.deployment.prefill_budget

    def schedule(self):
        d, budget, chunks = self.sim.deployment, self.budget, []
        cap = chunk_cap(budget, d.prefill_chunk, len(self.queue))
        for r in self.queue:
            if budget == 0:
                break
            n = min(r.remaining, budget, cap)
            chunks.append((r, n))
            budget -= n
        if not chunks:
            return None
        tokens = sum(n for _, n in chunks)
        seconds = self.sim.profile.step_s(tokens, sum(r.chunk_pairs(n) for r, n in chunks))

        def done() -> None:
            self.step_times.observe(tokens, seconds)
            for r, n in chunks:
                r.remaining -= n
                if r.remaining == 0:
                    self.queue.remove(r)
                    self.sim.sample(r)
                    if r.last_s is None:
                        handoff = self.sim.profile.handoff_s(r.arrival.prompt_tokens)
                        self.sim.at(self.sim.now + handoff, lambda r=r: r.decode.enqueue(r))

        return seconds, done


class _Decode(_Server):
    def __init__(self, sim: "_Simulation"):
        super().__init__(sim)
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self.num_assigned = 0  # picked for it and not finished: the gateway's decode cost
        self.local_tokens = 0  # tokens of prompts it prefills itself, before their first token
        self.pacer = PromptPacer(sim.deployment.tpot_s)  # as a service paces prompts

    @property
    def decoding(self) -> int:
        return sum(1 for r in self.running if not r.remaining)

    def enqueue(self, r: _Request) -> None:
        self.waiting.append(r)
        self.kick()

    def schedule(self):
        d = self.sim.deployment
        cap = d.decode_max_batch
        if d.tpot_s is not None:
            cap = max_batch_for_tpot(self.step_times.fit(), d.tpot_s, cap)
        budget, batch = d.decode_budget, []
        chunk = chunk_cap(budget, d.decode_chunk, len(self.running) + len(self.waiting))
        room = self.pacer.cap(self.decoding, budget)  # the scheduler's prompt_cap
        for r in self.running:
            if budget == 0:
                break
            n = min(r.remaining, budget, chunk, room) or 1  # a prompt chunk, else a decode
            if r.remaining and not room:
                continue
            batch.append((r, n))
            budget -= n
            room -= n if r.remaining else 0
        while self.waiting and budget > 0 and len(self.running) < cap:
            r = self.waiting[0]
            n = min(r.remaining, budget, chunk, room) or 1
            if r.remaining and not room:
                break
            self.running.append(self.waiting.popleft())
            batch.append((r, n))
            budget -= n
            room -= n if r.remaining else 0
        if not batch:
            return None
        decodes = [r for r, _ in batch if r.remaining == 0]
        chunks = [(r, n) for r, n in batch if r.remaining]
        seconds = self.sim.profile.step_s(
            sum(n for _, n in chunks),
            sum(r.chunk_pairs(n) for r, n in chunks),
            len(decodes),
            sum(r.context for r in decodes),
        )

        def done() -> None:
            if not chunks:  # the service fits pure decode steps only
                self.step_times.observe(len(decodes), seconds)
            tokens = sum(n for _, n in chunks)
            self.pacer.observe(self.step_times.fit(), len(decodes), tokens, seconds)
            for r, n in batch:
                if r.remaining:
                    r.remaining -= n
                    if r.remaining:
                        continue
                self.sim.sample(r)
                if r.last_s is not None:
                    self.running.remove(r)

        return seconds, done


class _Simulation:
    def __init__(self, profile: Profile, deployment: Deployment):
        self.profile, self.deployment = profile, deployment
        self.now = 0.0
        self.events: list[tuple[float, int, Callable[[], None]]] = []
        self.order = itertools.count()  # ties run in the order they were scheduled
        self.prefills = [_Prefill(self) for _ in range(deployment.num_prefill)]
        self.decodes = [_Decode(self) for _ in range(deployment.num_decode)]
        self.num_inflight = 0

    def at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.events, (when, next(self.order), fn))

    def run(self) -> None:
        while self.events:
            self.now, _, fn = heapq.heappop(self.events)
            fn()

    def arrive(self, r: _Request) -> None:
        d = self.deployment
        if self.num_inflight + 1 > d.max_inflight:
            r.rejected = True
            return
        n = r.arrival.prompt_tokens
        decode = min(self.decodes, key=lambda s: s.num_assigned)
        local = not self.prefills or n <= d.local_prefill_tokens
        if not local and n <= d.busy_prefill_tokens:  # as gateway/router.py steals work
            local = self.steals(decode, n)
        prefill = None if local else min(self.prefills, key=lambda p: p.queued_tokens)
        if prefill is not None and d.admission_ttft_s is not None:
            decision = admit(
                prefill.queued_tokens,
                r.arrival.prompt_tokens,
                prefill.step_times.fit(),
                d.prefill_budget,
                d.admission_ttft_s,
                ahead_tokens=prefill.ahead_tokens,
                chunk_tokens=chunk_cap(d.prefill_budget, d.prefill_chunk, 2),
            )
            if not decision.admitted:
                r.rejected = True
                return
        self.num_inflight += 1
        r.decode = decode
        decode.num_assigned += 1
        if prefill is None:
            decode.local_tokens += n
            r.prefilled_on_decode = True
            decode.enqueue(r)
        else:
            prefill.queue.append(r)
            prefill.kick()

    def steals(self, decode: _Decode, n: int) -> bool:
        """Whether the decode's core, in its TPOT slack, computes the prompt sooner than the
        least loaded prefill (gateway.router.local_wait_s and remote_wait_s)."""
        prefill = min(self.prefills, key=lambda p: p.queued_tokens)
        fit = prefill.step_times.fit()
        if fit is None or sum(fit) <= 0:
            return False
        rate = decode.pacer.rate(decode.step_times.fit(), decode.decoding) or 0.5 / max(
            fit[1], 1e-9
        )
        remote_s = prefill_seconds(prefill.queued_tokens + n, fit, self.deployment.prefill_budget)
        return (decode.local_tokens + n) / rate < remote_s

    def sample(self, r: _Request) -> None:
        """A token of `r` at `now`; the last one ends it."""
        r.num_output += 1
        if r.first_s is None:
            r.first_s = self.now
            if r.prefilled_on_decode:
                r.decode.local_tokens -= r.arrival.prompt_tokens
        if r.num_output == r.arrival.output_tokens:
            r.last_s = self.now
            r.decode.num_assigned -= 1
            self.num_inflight -= 1


@dataclass
class Outcome:
    records: list[RequestRecord]
    duration_s: float

    def summary(self, slo: SLO) -> dict:
        """`baton bench`'s summary of these requests (metrics.summarize)."""
        return summarize(self.records, self.duration_s, slo)


def simulate(profile: Profile, deployment: Deployment, arrivals: list[Arrival]) -> Outcome:
    if deployment.num_decode < 1:
        raise ValueError("a deployment needs a decode service at least")
    sim = _Simulation(profile, deployment)
    requests = [_Request(a, a.prompt_tokens) for a in arrivals]
    for r in requests:
        sim.at(r.arrival.at_s, lambda r=r: sim.arrive(r))
    sim.run()
    records = []
    for i, r in enumerate(requests):
        a = r.arrival
        rec = RequestRecord(i, 0, a.prompt_tokens, a.output_tokens, a.at_s)
        if r.rejected:
            rec.status = "http 429"
        else:
            rec.status, rec.output_tokens = "ok", a.output_tokens
            rec.ttft_s, rec.e2e_s = r.first_s - a.at_s, r.last_s - a.at_s
        records.append(rec)
    return Outcome(records, sim.now)
