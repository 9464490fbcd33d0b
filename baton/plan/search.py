"""Every prefill:decode split of the workers times every knob setting, simulated and ranked;
the best written back as a BatonConfig."""

import dataclasses
import math
from dataclasses import dataclass

import msgspec

from baton.bench.metrics import SLO
from baton.config import BatonConfig
from baton.plan.profile import Profile
from baton.plan.simulate import Arrival, Deployment, simulate

BUDGETS = (256, 512, 1024, 2048)  # prompt tokens a step
BATCHES = (8, 16, 32, 64)  # decode max_num_seqs


def splits(num_workers: int) -> list[tuple[int, int]]:
    """(prefill, decode) counts: 0:N (aggregated: decodes prefill locally) to N-1:1."""
    return [(p, num_workers - p) for p in range(num_workers)]


def candidates(
    base: Deployment, num_workers: int, budgets: tuple[int, ...], batches: tuple[int, ...]
) -> list[Deployment]:
    """`base` (the config's gateway and SLO settings) at every split and knob setting; the
    budget is the prefill pool's, or the decodes' when there is none."""
    out = []
    for num_prefill, num_decode in splits(num_workers):
        for budget in budgets:
            for batch in batches:
                budget_key = "prefill_budget" if num_prefill else "decode_budget"
                out.append(
                    dataclasses.replace(
                        base,
                        num_prefill=num_prefill,
                        num_decode=num_decode,
                        decode_max_batch=batch,
                        **{budget_key: budget},
                    )
                )
    return out


@dataclass
class Prediction:
    deployment: Deployment
    summary: dict  # baton.bench.metrics.summarize's


def rank(summary: dict, slo: SLO) -> tuple:
    """Meeting the attainment target first, then the share that meets the SLO, then the
    headroom (the p90 nearest its target, as a fraction of it, lower first). Not goodput
    itself: on the same arrivals it moves with the attainment, and beyond that only with
    when the last request happens to end."""
    ttft, tpot = summary["ttft_ms"]["p90"], summary["tpot_ms"]["p90"]
    pressure = max(
        math.inf if ttft is None else ttft / slo.ttft_ms,
        0.0 if tpot is None else tpot / slo.tpot_ms,  # one-token answers have no TPOT
    )
    return (summary["meets_attainment"], summary["slo_attainment"], -pressure)


def search(
    profile: Profile, arrivals: list[Arrival], slo: SLO, deployments: list[Deployment]
) -> list[Prediction]:
    """Each deployment simulated on the same arrivals, best first."""
    predictions = [Prediction(d, simulate(profile, d, arrivals).summary(slo)) for d in deployments]
    return sorted(predictions, key=lambda p: rank(p.summary, slo), reverse=True)


def num(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def table(predictions: list[Prediction], slo: SLO) -> str:
    """One row per prediction, best first; max batch values that predict the same (the TPOT
    cap binds below them) share a row."""
    head = [
        "split P:D", "token budget", "max batch", "TTFT p90 ms", "TPOT p90 ms",
        "goodput req/s", f"SLO met (>= {slo.attainment:.0%}?)", "429s",
    ]  # fmt: skip
    rows: list[list[str]] = []
    for p in predictions:
        d, s = p.deployment, p.summary
        row = [
            d.split + (" (aggregated)" if not d.num_prefill else ""),
            str(d.token_budget),
            str(d.decode_max_batch),
            num(s["ttft_ms"]["p90"]),
            num(s["tpot_ms"]["p90"], 1),
            num(s["goodput"], 2),
            f"{s['slo_attainment']:.0%} ({'yes' if s['meets_attainment'] else 'no'})",
            str(s["num_requests"] - s["num_ok"]),
        ]
        if rows and rows[-1][:2] == row[:2] and rows[-1][3:] == row[3:]:
            rows[-1][2] += f", {row[2]}"
        else:
            rows.append(row)
    lines = [head, ["---"] * len(head), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def cpu_list(cpus: range) -> str | None:
    return None if not cpus else f"{cpus[0]}-{cpus[-1]}" if len(cpus) > 1 else str(cpus[0])


def to_config(base: BatonConfig, d: Deployment, num_cores: int) -> BatonConfig:
    """`base` with the pools' counts and knobs set to `d`, each worker pinned to its share of
    cores 0..num_cores-1 with as many torch threads (what the profile was timed on)."""
    threads = max(1, num_cores // (d.num_prefill + d.num_decode))
    prefill_cpus = range(d.num_prefill * threads)
    decode_cpus = range(prefill_cpus.stop, prefill_cpus.stop + d.num_decode * threads)
    replace = msgspec.structs.replace
    prefill = replace(base.prefill, count=d.num_prefill, cpus=cpu_list(prefill_cpus))
    if d.num_prefill:
        prefill = replace(prefill, max_num_batched_tokens=d.prefill_budget)
    decode = replace(
        base.decode,
        count=d.num_decode,
        cpus=cpu_list(decode_cpus),
        max_num_seqs=d.decode_max_batch,
        max_num_batched_tokens=d.decode_budget,
    )
    return replace(
        base, engine=replace(base.engine, threads=threads), prefill=prefill, decode=decode
    )
