"""A bench's results three ways: a Markdown table (stdout), a JSON file with every request's
timings, and PNG plots (latency percentiles against load; CDFs of TTFT and TPOT)."""

import dataclasses
import json
import math
from pathlib import Path

from baton.bench.load import Run
from baton.bench.metrics import SLO

RATIO_KEYS = {  # columns that carry "(ratio to the baseline)" in a comparison
    "req/s": ("request_throughput",),
    "out tok/s": ("output_throughput",),
    "TTFT p50": ("ttft_ms", "p50"),
    "TPOT p50": ("tpot_ms", "p50"),
    "goodput": ("goodput",),
}


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def pick(summary: dict, keys: tuple[str, ...]) -> float | None:
    for k in keys:
        summary = summary[k]
    return summary


def markdown(runs: list[Run], slo: SLO, unavailable: dict[str, str], baseline: str | None) -> str:
    """One row per (system, load). With a baseline, the headline columns also show this
    system's figure divided by the baseline's at the same load."""
    base = {r.load: r.summary for r in runs if r.system == baseline}

    def cell(run: Run, column: str) -> str:
        value = pick(run.summary, RATIO_KEYS[column])
        ref = pick(base[run.load], RATIO_KEYS[column]) if run.load in base else None
        if run.system == baseline or value is None or not ref:
            return fmt(value)
        return f"{fmt(value)} ({value / ref:.2f}x)"

    head = [
        "system", "load", "ok / sent", "req/s", "out tok/s", "TTFT p50 / p90 / p99 ms",
        "TPOT p50 / p90 / p99 ms", "ITL p50 / p99 ms", "E2E p50 / p99 ms",
        f"SLO met (>= {slo.attainment:.0%}?)", "goodput req/s",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        s = run.summary
        ttft, tpot, itl, e2e = s["ttft_ms"], s["tpot_ms"], s["itl_ms"], s["e2e_ms"]
        row = [
            run.system,
            run.load.label,
            f"{s['num_ok']} / {s['num_requests']}",
            cell(run, "req/s"),
            cell(run, "out tok/s"),
            f"{cell(run, 'TTFT p50')} / {fmt(ttft['p90'])} / {fmt(ttft['p99'])}",
            f"{cell(run, 'TPOT p50')} / {fmt(tpot['p90'])} / {fmt(tpot['p99'])}",
            f"{fmt(itl['p50'])} / {fmt(itl['p99'])}",
            f"{fmt(e2e['p50'])} / {fmt(e2e['p99'])}",
            f"{s['slo_attainment']:.0%} ({'yes' if s['meets_attainment'] else 'no'})",
            cell(run, "goodput"),
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append(
        f"SLO: TTFT <= {slo.ttft_ms:g} ms and TPOT <= {slo.tpot_ms:g} ms; goodput counts the "
        "requests meeting both per second, every sent request (rejected, failed, aborted) "
        "in the denominator."
        + (f" Ratios: system / {baseline} at the same load." if baseline else "")
    )
    for system in dict.fromkeys(r.system for r in runs):
        met = [r for r in runs if r.system == system and r.summary["meets_attainment"]]
        best = max(met, key=lambda r: r.summary["goodput"], default=None)
        verdict = (
            f"best goodput {fmt(best.summary['goodput'])} req/s at {best.load.label}"
            if best
            else "no load met it"
        )
        lines.append(f"- {system}, goodput at {slo.attainment:.0%} SLO attainment: {verdict}")
    for run in runs:  # sessions of several turns: TTFT by turn index
        by_turn = run.summary.get("ttft_by_turn_ms", {})
        if len(by_turn) > 1:
            cells = ", ".join(f"{t}: {fmt(v['p50'])} / {fmt(v['p90'])}" for t, v in by_turn.items())
            follow = run.summary["ttft_followup_ms"]
            lines.append(
                f"- {run.system}, {run.load.label}: TTFT p50 / p90 ms by turn {cells}; "
                f"every follow-up turn {fmt(follow['p50'])} / {fmt(follow['p90'])}"
            )
    for run in runs:  # how far admission's TTFT predictions were off (Baton's metric)
        if err := run.summary.get("ttft_prediction_error"):
            lines.append(
                f"- {run.system}, {run.load.label}: real / predicted TTFT at admission, p50 "
                f"{err['p50']:.2f}, p90 {err['p90']:.2f} ({err['count']:g} predicted requests)"
            )
    for system, why in unavailable.items():
        lines.append(f"- {system}: not measured: {why}")
    return "\n".join(lines)


def matrix_markdown(runs: list[Run], baseline: str | None) -> str:
    """One row per (workload, load), a column per system: its goodput (and, with a baseline,
    the ratio to the baseline's at the same workload and load) and the requests it refused."""
    systems = list(dict.fromkeys(r.system for r in runs))
    by = {(r.workload, r.load, r.system): r.summary for r in runs}
    head = ["workload", "load", *(f"{s} goodput (429s)" for s in systems)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for workload, load in dict.fromkeys((r.workload, r.load) for r in runs):
        ref = by.get((workload, load, baseline), {}).get("goodput")
        row = [workload, load.label]
        for system in systems:
            s = by.get((workload, load, system))
            if s is None:
                row.append("-")
                continue
            ratio = f" {s['goodput'] / ref:.2f}x" if ref and system != baseline else ""
            row.append(f"{fmt(s['goodput'])}{ratio} ({s['statuses'].get('http 429', 0)})")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def load_dict(run: Run) -> dict:
    rate = None if math.isinf(run.load.rate) else run.load.rate  # JSON has no inf
    return {**dataclasses.asdict(run.load), "rate": rate, "label": run.load.label}


def write_json(path: Path, runs: list[Run], meta: dict) -> None:
    out = {
        **meta,
        "runs": [
            {
                "system": r.system,
                "workload": r.workload,
                "load": load_dict(r),
                "seed": r.seed,
                "duration_s": r.duration_s,
                "cpu_pressure_avg10": r.cpu_pressure,
                "summary": r.summary,
                "requests": [{**dataclasses.asdict(q), "tpot_s": q.tpot_s} for q in r.records],
            }
            for r in runs
        ],
    }
    path.write_text(json.dumps(out, indent=1))


def plot(runs: list[Run], slo: SLO, out_dir: Path) -> list[Path]:
    """latency_vs_load.png and cdf.png, one colour per system."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    colours = {s: f"C{i}" for i, s in enumerate(dict.fromkeys(r.system for r in runs))}
    paths = []
    for name, draw in (("latency_vs_load.png", latency_vs_load), ("cdf.png", cdfs)):
        fig = draw(plt, runs, slo, colours)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        paths.append(out_dir / name)
    return paths


def latency_vs_load(plt, runs: list[Run], slo: SLO, colours: dict[str, str]):
    """p50 (solid), p90 (dashed) and p99 (dotted) of each latency against the load."""
    # the offered rate when every load has one; otherwise the achieved request rate
    offered = all(not r.load.concurrency and math.isfinite(r.load.rate) for r in runs)
    x_of = (lambda r: r.load.rate) if offered else (lambda r: r.summary["request_throughput"])
    xlabel = f"{'offered' if offered else 'achieved'} request rate (req/s)"
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    metrics = [("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E")]
    for ax, (key, title) in zip(axes.flat, metrics, strict=True):
        for system, colour in colours.items():
            mine = sorted((r for r in runs if r.system == system), key=x_of)
            xs = [x_of(r) for r in mine]
            for q, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
                ys = [r.summary[key][q] for r in mine]
                ax.plot(xs, ys, style, marker="o", color=colour, label=f"{system} {q}")
        ax.set(title=f"{title} (ms)", xlabel=xlabel)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    return fig


def cdfs(plt, runs: list[Run], slo: SLO, colours: dict[str, str]):
    """One row per load: TTFT and TPOT CDFs over all sent requests (failed ones never
    arrive, so a curve that stops short of 1 shows the misses), the SLO dashed."""
    import numpy as np

    loads = list(dict.fromkeys(r.load for r in runs))
    fig, axes = plt.subplots(len(loads), 2, figsize=(11, 3.5 * len(loads)), squeeze=False)
    for row, load in zip(axes, loads, strict=True):
        for ax, name, target in ((row[0], "TTFT", slo.ttft_ms), (row[1], "TPOT", slo.tpot_ms)):
            for run in (r for r in runs if r.load == load):
                values = [q.ttft_s if name == "TTFT" else q.tpot_s for q in run.records if q.ok]
                ms = np.sort([v * 1e3 for v in values if v is not None])
                share = np.arange(1, len(ms) + 1) / max(len(run.records), 1)
                ax.step(ms, share, where="post", color=colours[run.system], label=run.system)
            ax.axvline(target, color="grey", ls="--", lw=1)
            ax.set_xscale("log")  # systems and the SLO can be orders of magnitude apart
            ax.set(title=f"{name} CDF, {load.label}", xlabel="ms", ylabel="share of sent requests")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return fig
