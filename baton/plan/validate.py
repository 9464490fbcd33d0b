"""How far the simulator is from a real run: the requests of a `baton bench` results.json
(their send times and lengths) replayed through the simulation of the deployment that
served them, predicted against measured."""

import json
from dataclasses import dataclass
from pathlib import Path

from baton.bench.metrics import SLO
from baton.plan.profile import Profile
from baton.plan.simulate import Arrival, Deployment, simulate

# name -> where summarize() keeps it
METRICS = {
    "TTFT p90 ms": ("ttft_ms", "p90"),
    "TPOT p90 ms": ("tpot_ms", "p90"),
    "goodput req/s": ("goodput",),
    "SLO attainment": ("slo_attainment",),
}


def pick(summary: dict, keys: tuple[str, ...]) -> float | None:
    for k in keys:
        summary = summary[k]
    return summary


def relative_error(predicted: float | None, measured: float | None) -> float | None:
    if predicted is None or measured is None or measured == 0:
        return None
    return (predicted - measured) / measured


@dataclass
class Comparison:
    run: str  # system and load, as the bench labelled them
    # metric -> (predicted, measured, relative error)
    rows: dict[str, tuple[float | None, float | None, float | None]]


def compare(results_path: str | Path, profile: Profile, deployment: Deployment) -> list[Comparison]:
    """One comparison per run in the file, under the SLO the bench used."""
    results = json.loads(Path(results_path).read_text())
    slo = SLO(**results["slo"])
    out = []
    for run in results["runs"]:
        arrivals = [
            Arrival(q["start_s"], q["prompt_tokens"], q["max_tokens"]) for q in run["requests"]
        ]
        predicted = simulate(profile, deployment, arrivals).summary(slo)
        rows = {}
        for name, keys in METRICS.items():
            p, m = pick(predicted, keys), pick(run["summary"], keys)
            rows[name] = (p, m, relative_error(p, m))
        out.append(Comparison(f"{run['system']}, {run['load']['label']}", rows))
    return out


def report(comparisons: list[Comparison]) -> str:
    def cell(x: float | None) -> str:
        return "-" if x is None else f"{x:,.2f}"

    lines = []
    for c in comparisons:
        lines += [f"{c.run}:", "| metric | predicted | measured | error |", "|---|---|---|---|"]
        for name, (p, m, err) in c.rows.items():
            lines.append(
                f"| {name} | {cell(p)} | {cell(m)} | {'-' if err is None else f'{err:+.0%}'} |"
            )
        lines.append("")
    return "\n".join(lines)
