"""Per-request timings and what a run adds up to: latency percentiles, throughput, goodput.

Definitions (the same as vLLM's `bench serve`, so figures compare):
- TTFT: request sent -> first streamed chunk that carries a choice.
- ITL: the gap between consecutive such chunks (one token per chunk on Baton and vLLM).
- TPOT: (E2E - TTFT) / (output tokens - 1); undefined for a one-token answer.
- E2E: request sent -> the last chunk that carries a choice.
- Goodput: requests per second that succeeded and met both SLO targets. Every issued request
  is in the denominator: rejected (429/503), failed and aborted ones count as misses.
"""

import math
import re
from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    session: int
    turn: int
    prompt_tokens: int
    max_tokens: int
    start_s: float = 0.0  # since the run began
    status: str = "pending"  # ok | http <code> | error | aborted
    error: str = ""
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(frozen=True)
class SLO:
    ttft_ms: float = 2000.0
    tpot_ms: float = 100.0
    attainment: float = 0.9  # the share of requests that must meet both targets

    def met(self, r: RequestRecord) -> bool:
        tpot = r.tpot_s
        return (
            r.ok and r.ttft_s * 1e3 <= self.ttft_ms and (tpot is None or tpot * 1e3 <= self.tpot_ms)
        )


def stats_ms(values_s: list[float]) -> dict[str, float | None]:
    """Mean and percentiles in milliseconds (numpy's linear interpolation, as vLLM)."""
    if not values_s:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    ms = np.asarray(values_s) * 1e3
    return {"mean": float(ms.mean()), **{f"p{q}": float(np.percentile(ms, q)) for q in PERCENTILES}}


def summarize(records: list[RequestRecord], duration_s: float, slo: SLO) -> dict:
    done = [r for r in records if r.ok]
    num_good = sum(slo.met(r) for r in records)
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens for r in done)
    attainment = num_good / len(records) if records else 0.0
    return {
        "num_requests": len(records),
        "num_ok": len(done),
        "statuses": statuses,
        "duration_s": duration_s,
        "request_throughput": len(done) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration_s,
        "ttft_ms": stats_ms([r.ttft_s for r in done]),
        "tpot_ms": stats_ms([t for r in done if (t := r.tpot_s) is not None]),
        "itl_ms": stats_ms([gap for r in done for gap in r.itl_s]),
        "e2e_ms": stats_ms([r.e2e_s for r in done]),
        # sessions of several turns (agent): a follow-up's TTFT is what a KV cache kept
        # between turns saves, or not
        "ttft_by_turn_ms": {
            turn: stats_ms([r.ttft_s for r in done if r.turn == turn])
            for turn in sorted({r.turn for r in done})
        },
        "ttft_followup_ms": stats_ms([r.ttft_s for r in done if r.turn > 0]),
        "slo_attainment": attainment,
        "meets_attainment": attainment >= slo.attainment,
        "goodput": num_good / duration_s,
    }


# Baton's admission records each request's real TTFT over the TTFT it predicted (a histogram)
PREDICTION_ERROR = "baton_ttft_prediction_error"


def buckets(metrics_text: str, name: str) -> dict[float, float]:
    """A Prometheus histogram's cumulative bucket counts, by upper bound, from /metrics text
    ({} where the server has no such histogram, as vLLM has not)."""
    found = re.findall(rf'^{name}_bucket{{[^}}]*le="([^"]+)"[^}}]*}} (\S+)$', metrics_text, re.M)
    return {float(le): float(count) for le, count in found}


def quantiles(before: dict[float, float], after: dict[float, float]) -> dict | None:
    """p50 and p90 of what a histogram counted between two scrapes, interpolated inside each
    bucket as Prometheus' histogram_quantile does (the first bucket from 0); None if nothing."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return None
    out: dict[str, float] = {"count": total}
    for q in (50, 90):
        rank = total * q / 100
        i = next(i for i, c in enumerate(counts) if c >= rank)
        if math.isinf(bounds[i]):  # beyond the last finite bound: that bound is the answer
            out[f"p{q}"] = bounds[i - 1] if i else 0.0
            continue
        lo, below = (bounds[i - 1], counts[i - 1]) if i else (0.0, 0.0)
        inside = counts[i] - below
        out[f"p{q}"] = lo + (bounds[i] - lo) * ((rank - below) / inside if inside else 1.0)
    return out
