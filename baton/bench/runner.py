"""`baton bench` and `baton bench compare`: flags -> workload, loads (and arms) -> runs ->
a Markdown table on stdout, results.json, and plots, all under --out-dir."""

import argparse
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx
import msgspec
from transformers import AutoTokenizer

from baton.bench.arms import Arm, Limits, load_arms, resolve, running
from baton.bench.load import Bench, Load, Run
from baton.bench.metrics import SLO
from baton.bench.report import markdown, matrix_markdown, plot, write_json
from baton.bench.workloads import MATRIX, Dist, WorkloadSpec, vocabulary
from baton.cpus import parse_cpus
from baton.model.files import resolve_model_dir


def workload_spec(args: argparse.Namespace) -> WorkloadSpec:
    try:
        return WorkloadSpec(
            name=args.workload,
            num_requests=args.num_requests,
            input_len=Dist.parse(args.input_len),
            output_len=Dist.parse(args.output_len),
            prefix_len=args.prefix_len,
            long_len=Dist.parse(args.long_len),
            long_output_len=Dist.parse(args.long_output_len),
            long_fraction=args.long_fraction,
            turns=args.turns,
            tool_len=Dist.parse(args.tool_len),
            think_s=Dist.parse(args.think_s),
        )
    except ValueError as e:
        raise SystemExit(str(e)) from e


def matrix(args: argparse.Namespace) -> list[tuple[str, WorkloadSpec, list[Load]]]:
    """The named workloads --matrix asks for, each with its rates."""
    names = list(MATRIX) if "all" in args.matrix else args.matrix
    if unknown := [n for n in names if n not in MATRIX]:
        raise SystemExit(f"unknown workload {unknown[0]!r}; the matrix has {', '.join(MATRIX)}")
    return [
        (n, replace(MATRIX[n][0], num_requests=args.num_requests), [Load(r) for r in MATRIX[n][1]])
        for n in names
    ]


def loads(args: argparse.Namespace) -> list[Load]:
    if args.concurrency:
        return [Load(concurrency=c) for c in args.concurrency]
    return [Load(rate=r, burstiness=args.burstiness) for r in args.rate]


def compare(
    args: argparse.Namespace, benches: list[Bench], out_dir: Path
) -> tuple[list[Run], dict[str, str], list[Arm]]:
    """Each arm in turn: start, wait for ready, sweep each bench's loads, stop."""
    limits = Limits(
        model=args.model or str(resolve_model_dir(None)),
        dtype=args.dtype,
        cpus=sorted(parse_cpus(args.cpus) or []),
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_gib=args.kv_cache_gib,
        max_model_len=args.max_model_len,
    )
    logs = out_dir / "logs"
    arms = resolve(args.arms, limits, args.port, logs, Path(args.vllm_script))
    if args.arms_file:
        arms += load_arms(Path(args.arms_file))
    runs: list[Run] = []
    unavailable: dict[str, str] = {}
    for arm in arms:
        if arm.unavailable:
            unavailable[arm.name] = arm.unavailable
            print(f"{arm.name}: skipped: {arm.unavailable}", file=sys.stderr)
            continue
        print(f"{arm.name}: starting, then {arm.url}{arm.ready_path} ...", file=sys.stderr)
        try:
            with running(arm, logs / f"{arm.name}.log"):
                for bench in benches:
                    runs += bench.sweep(arm.url, arm.name)
        except (RuntimeError, httpx.HTTPError) as e:
            unavailable[arm.name] = f"failed: {e}"
            print(f"{arm.name}: failed: {e}", file=sys.stderr)
    return runs, unavailable, arms


def main(args: argparse.Namespace) -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request under the bar
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out_dir = Path(args.out_dir or f"logs/bench/{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = args.tokenizer or resolve_model_dir(args.model)  # a GGUF: its conversion
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = workload_spec(args)
    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_attainment)
    named = matrix(args) if args.matrix else [("", spec, loads(args))]
    vocab = vocabulary(tokenizer)
    extra = (args.max_duration_s, args.warmup, args.api_key)
    benches = [Bench(w, ls, slo, args.seed, tokenizer, vocab, *extra, n) for n, w, ls in named]
    arms: list[Arm] = []
    if args.mode == "compare":
        runs, unavailable, arms = compare(args, benches, out_dir)
    else:
        url = args.url.rstrip("/")
        label = args.label or url.split("://")[-1]
        runs, unavailable = [r for b in benches for r in b.sweep(url, label)], {}
    measured = list(dict.fromkeys(r.system for r in runs))
    baseline = args.baseline
    if baseline is None and args.mode == "compare" and measured:
        baseline = "vllm-cpu" if "vllm-cpu" in measured else measured[0]
    tables = []
    for name, spec, _ in named:
        mine = [r for r in runs if r.workload == name]
        tables.append(f"{name or 'workload'}: {spec.describe()}, seed {args.seed}\n\n")
        tables[-1] += markdown(mine, slo, unavailable, baseline)
    if args.matrix:
        tables.append(matrix_markdown(runs, baseline))
    table = "\n\n".join(tables)
    print(f"\n{table}")
    (out_dir / "results.md").write_text(table + "\n")
    meta = {
        "command": sys.argv,
        "workloads": {
            name: {k: str(v) if isinstance(v, Dist) else v for k, v in vars(spec).items()}
            for name, spec, _ in named
        },
        "slo": vars(slo),
        "seed": args.seed,
        "tokenizer": str(tokenizer_dir),
        "arms": msgspec.to_builtins(arms),
        "unavailable": unavailable,
        "cpus": sorted(os.sched_getaffinity(0)),
        "started": started,
    }
    write_json(out_dir / "results.json", runs, meta)
    files = [out_dir / "results.json"]
    for name, _, _ in named:
        if mine := [r for r in runs if r.workload == name]:
            (out_dir / name).mkdir(exist_ok=True)
            files += plot(mine, slo, out_dir / name)
    print("\n" + "\n".join(f"wrote {p}" for p in files))
