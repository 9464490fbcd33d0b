"""`baton bench [compare]` flags. Only argparse here: `baton up` builds this parser too, and
must not pay for numpy, httpx or matplotlib."""

import argparse


def add_parser(sub) -> None:
    b = sub.add_parser(
        "bench",
        help="load generator: TTFT/TPOT/ITL/E2E, throughput, SLO goodput, plots",
        description="Drive an OpenAI-compatible server (`baton bench`), or start several "
        "systems one after another and measure each on the same workload (`baton bench compare`).",
    )
    b.add_argument("mode", nargs="?", choices=["run", "compare"], default="run")
    b.add_argument("--url", default="http://127.0.0.1:8000", help="run: the server to drive")
    b.add_argument("--label", help="run: the system's name in the outputs (default: the URL)")
    b.add_argument("--api-key", default=None)
    b.add_argument("--tokenizer", help="the served model's dir (default: --model, else Baton's)")
    b.add_argument("--out-dir", help="JSON, plots and logs (default: logs/bench/<time>)")

    w = b.add_argument_group("workload (seeded; lengths are DIST: N, uniform:LO:HI, "
                             "normal:MEAN:STD, lognormal:MEDIAN:SIGMA, exp:MEAN)")  # fmt: skip
    w.add_argument("--workload", choices=["random", "shared-prefix", "mixed", "shift", "agent", "tools"],
                   default="random",
                   help="tools: chat turns with tool_choice required (start Baton with "
                   "--chat-template hermes --tool-call-parser hermes)")  # fmt: skip
    w.add_argument("--num-requests", type=int, default=64, help="per load (turns, for agent)")
    w.add_argument("--input-len", default="512", help="prompt; the short ones in mixed")
    w.add_argument("--output-len", default="128")
    w.add_argument("--prefix-len", type=int, default=1024, help="shared-prefix: system prompt")
    w.add_argument("--long-len", default="uniform:2048:4096", help="mixed, shift: long prompts")
    w.add_argument("--long-output-len", default="64", help="mixed, shift: their outputs")
    w.add_argument("--long-fraction", type=float, default=0.1, help="mixed: share of long ones")
    w.add_argument("--turns", type=int, default=4, help="agent: turns per session")
    w.add_argument("--tool-len", default="uniform:64:256", help="agent: tool result per turn")
    w.add_argument("--think-s", default="exp:1", help="agent: seconds between turns")
    w.add_argument("--seed", type=int, default=0, help="load i of a sweep uses seed + i")
    w.add_argument("--matrix", nargs="+", metavar="NAME",
                   help="named workloads (short, mixed, long-prompt, long-output, chat, or all), "
                   "each at its own rates and --num-requests: one table of goodput ratios; "
                   "replaces the workload and load flags")  # fmt: skip

    g = b.add_argument_group("load (one run per value; every system gets the same)")
    how = g.add_mutually_exclusive_group()
    how.add_argument("--rate", type=float, nargs="+", default=[float("inf")],
                     help="open loop, req/s (sessions/s for agent); inf: all at once")  # fmt: skip
    how.add_argument("--concurrency", type=int, nargs="+", help="closed loop, in flight")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson")
    g.add_argument("--max-duration-s", type=float, default=None,
                   help="per run; requests in flight then are aborted (and count as misses)")  # fmt: skip
    g.add_argument("--warmup", type=int, default=2, help="short requests before each run")

    s = b.add_argument_group("SLO")
    s.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    s.add_argument("--slo-tpot-ms", type=float, default=100.0)
    s.add_argument("--slo-attainment", type=float, default=0.9, help="share that must meet both")

    c = b.add_argument_group("compare: the arms and the limits they share")
    c.add_argument("--arms", nargs="*", default=["baton-disagg", "baton-agg", "vllm-cpu"],
                   help="built-in names (baton-disagg, baton-agg, each also -int8, vllm-cpu, "
                   "baton-autoscale, llama-cpp, llama-cpp-q8) or NAME=URL; "
                   "none: only --arms-file's")  # fmt: skip
    c.add_argument("--arms-file", help="TOML of [[arm]] tables: name, url, start, stop, env, "
                   "ready_path, ready_timeout_s (run after --arms)")  # fmt: skip
    c.add_argument("--baseline", help="ratios are to this arm (default: vllm-cpu if measured, "
                   "else the first measured)")  # fmt: skip
    c.add_argument("--model", help="model dir (default: Baton's default model)")
    c.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    c.add_argument("--cpus", default="0-1", help="cores every arm runs on")
    c.add_argument("--port", type=int, default=8300, help="the first arm's; then +1 each")
    c.add_argument("--max-num-seqs", type=int, default=64)
    c.add_argument("--max-num-batched-tokens", type=int, default=512)
    c.add_argument("--kv-cache-gib", type=int, default=2, help="per service")
    c.add_argument("--max-model-len", type=int, default=None)
    c.add_argument("--vllm-script", default="/work/shared/anchors/vllm-cpu.sh")
    b.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> None:
    from baton.bench.runner import main

    main(args)
