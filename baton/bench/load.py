"""When requests are sent: open-loop arrivals (Poisson, or gamma bursts) or a closed loop
of fixed concurrency, bounded in requests and in time; one run -> its timed records."""

import asyncio
import dataclasses
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
from tqdm import tqdm

from baton.bench.client import complete, served_model
from baton.bench.metrics import (
    PREDICTION_ERROR,
    SLO,
    RequestRecord,
    buckets,
    quantiles,
    summarize,
)
from baton.bench.workloads import Dist, Session, WorkloadSpec, build

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Load:
    """Open loop at `rate` sessions/s (a session is one request unless it is an agent's),
    or, with `concurrency`, a closed loop: that many sessions in flight, each followed by the
    next as soon as it ends."""

    rate: float = math.inf  # inf: all at once
    concurrency: int | None = None
    burstiness: float = 1.0  # gamma shape of the gaps: 1 is Poisson, below 1 burstier

    @property
    def label(self) -> str:
        if self.concurrency:
            return f"concurrency {self.concurrency}"
        return "all at once" if math.isinf(self.rate) else f"{self.rate:g} req/s"


def arrival_times(load: Load, n: int, rng: np.random.Generator) -> np.ndarray:
    """Send offsets in seconds, the first at 0; gaps are gamma(shape k, mean 1/rate)."""
    if math.isinf(load.rate):
        return np.zeros(n)
    gaps = rng.gamma(load.burstiness, 1 / (load.rate * load.burstiness), n)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])])


@dataclass
class Run:
    system: str
    load: Load
    seed: int
    records: list[RequestRecord]
    duration_s: float
    cpu_pressure: float | None  # /proc/pressure/cpu avg10 at the start: noise from others
    summary: dict
    workload: str = ""  # its name in the matrix (workloads.MATRIX)


async def drive(
    client: httpx.AsyncClient,
    sessions: list[Session],
    load: Load,
    rng: np.random.Generator,
    encode: Callable[[str], list[int]],
    max_duration_s: float | None,
    label: str,
    decode: Callable[[list[int]], str] = str,
) -> tuple[list[RequestRecord], float]:
    """Runs the sessions under `load`. At the time bound, requests in flight are aborted and
    kept (as misses); requests not yet sent are not issued and not counted."""
    model = await served_model(client)
    records: list[RequestRecord] = []
    bar = tqdm(total=sum(len(s.turns) for s in sessions), desc=label, unit="req")
    t0 = time.perf_counter()

    run = uuid.uuid4().hex[:8]

    async def run_session(i: int, session: Session) -> None:
        context: list[int] = []
        name = f"bench-{run}-{i}" if len(session.turns) > 1 else None  # x-session-id
        for k, turn in enumerate(session.turns):
            await asyncio.sleep(turn.think_s)
            context = context + turn.new_ids
            rec = RequestRecord(i, k, len(context), turn.max_tokens)
            records.append(rec)
            has_next = k + 1 < len(session.turns)
            # a tools turn's ids go as the user's text (a chat turn)
            text = decode(context) if turn.tools else None
            try:
                ids, text = await complete(client, model, context, rec, t0, has_next, text, name)
            except asyncio.CancelledError:
                if rec.status == "pending":
                    rec.status = "aborted"
                raise
            finally:
                bar.update()
            if not rec.ok:
                return  # the session cannot go on without this answer
            if has_next:
                context += ids or encode(text)  # a server without return_token_ids

    async def open_loop() -> None:
        async def at(offset: float, i: int, session: Session) -> None:
            await asyncio.sleep(offset - (time.perf_counter() - t0))
            await run_session(i, session)

        offsets = arrival_times(load, len(sessions), rng)
        await asyncio.gather(
            *(at(o, i, s) for i, (o, s) in enumerate(zip(offsets, sessions, strict=True)))
        )

    async def closed_loop() -> None:
        queue = iter(enumerate(sessions))  # shared: each free worker takes the next session

        async def worker() -> None:
            for i, session in queue:
                await run_session(i, session)

        await asyncio.gather(*(worker() for _ in range(load.concurrency)))

    try:
        async with asyncio.timeout(max_duration_s):
            await (closed_loop() if load.concurrency else open_loop())
    except TimeoutError:
        pass
    finally:
        bar.close()
    records.sort(key=lambda r: (r.session, r.turn))
    return records, time.perf_counter() - t0


async def scrape(client: httpx.AsyncClient, histogram: str) -> dict[float, float]:
    """The server's `histogram` buckets now ({} where it has no /metrics or no such one)."""
    try:
        r = await client.get("/metrics")
    except httpx.HTTPError:
        return {}
    return buckets(r.text, histogram) if r.status_code == 200 else {}


def cpu_pressure() -> float | None:
    try:
        some = Path("/proc/pressure/cpu").read_text().split("\n")[0]
    except OSError:
        return None
    return float(some.split("avg10=")[1].split()[0])


WARMUP = WorkloadSpec(input_len=Dist.parse("32"), output_len=Dist.parse("8"))


@dataclass
class Bench:
    """What every system is measured on: the workload, the loads, the seed and the SLO."""

    spec: WorkloadSpec
    loads: list[Load]
    slo: SLO
    seed: int
    tokenizer: "PreTrainedTokenizerBase"
    vocab: np.ndarray
    max_duration_s: float | None = None  # per run
    warmup: int = 2
    api_key: str | None = None
    workload: str = ""  # its name in the matrix (workloads.MATRIX)

    def sweep(self, url: str, system: str) -> list[Run]:
        """Every load in turn. Load i uses seed + i: a server that stays up across the sweep
        never finds a later load's prompts in its prefix cache, and every system gets the
        same prompts at the same load."""
        return [
            asyncio.run(self.measure(url, system, load, self.seed + i))
            for i, load in enumerate(self.loads)
        ]

    async def measure(self, url: str, system: str, load: Load, seed: int) -> Run:
        """One run, after `warmup` short requests of its own."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        timeout = httpx.Timeout(None, connect=30)
        encode = lambda text: self.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        async with httpx.AsyncClient(
            base_url=url, headers=headers, limits=limits, timeout=timeout
        ) as client:
            if self.warmup:
                # a seed no workload uses (theirs are below 2**32): no warm-up prompt is a
                # prefix of a measured one, so nothing measured hits the prefix cache
                spec = dataclasses.replace(WARMUP, num_requests=self.warmup)
                warm = build(spec, self.vocab, 2**32 + seed)
                rng = np.random.default_rng(0)
                await drive(
                    client, warm, Load(concurrency=self.warmup), rng, encode, None, "warm-up"
                )
            pressure = cpu_pressure()
            before = await scrape(client, PREDICTION_ERROR)
            records, duration_s = await drive(
                client,
                build(self.spec, self.vocab, seed),
                load,
                np.random.default_rng(seed),
                encode,
                self.max_duration_s,
                f"{system} {load.label}",
                self.tokenizer.decode,
            )
            after = await scrape(client, PREDICTION_ERROR)
        summary = summarize(records, duration_s, self.slo)
        summary["ttft_prediction_error"] = quantiles(before, after)
        return Run(system, load, seed, records, duration_s, pressure, summary, self.workload)
