"""`baton plan` flags. Only argparse at import: `baton up` builds this parser too."""

import argparse
import os
import sys
from typing import TYPE_CHECKING

from baton.cli import ENGINE_FLAGS, add_config_args, config_from

if TYPE_CHECKING:
    from baton.config import EngineConfig
    from baton.plan.profile import Profile

PLAN_FLAGS = {
    "--model": ENGINE_FLAGS["--model"],
    "--dtype": ENGINE_FLAGS["--dtype"],
    "--slo-ttft-ms": ("slo.ttft_ms", float),
    "--slo-tpot-ms": ("slo.tpot_ms", float),
    "--slo-attainment": ("slo.attainment", float),
}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="profile this machine, simulate each prefill:decode split, write the best config",
        description="Time prefill and decode steps of the configured model on this machine "
        "(or load a saved --profile), simulate every prefill:decode split of --workers and "
        "every knob setting under the workload and the [slo] targets, print them ranked and "
        "write the best as a config (--out). With --validate, replay a `baton bench` "
        "results.json through the config's deployment instead, predicted against measured.",
    )
    add_config_args(p, PLAN_FLAGS)
    p.add_argument("--workers", type=int, default=2, help="services to split into P:D")
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)),
                   help="CPUs the workers share (default: this process's)")  # fmt: skip
    p.add_argument("--profile", help="a saved profile (JSON) instead of profiling now")
    p.add_argument("--profile-out", help="save the profile (JSON) here")
    w = p.add_argument_group("workload (DIST: N, uniform:LO:HI, normal:MEAN:STD, ...)")
    w.add_argument("--rate", type=float, default=1.0, help="Poisson arrivals, req/s")
    w.add_argument("--input-len", default="512", help="prompt tokens, DIST")
    w.add_argument("--output-len", default="128", help="output tokens, DIST")
    w.add_argument("--num-requests", type=int, default=200)
    w.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("knob grid")
    g.add_argument("--budgets", type=int, nargs="+", help="prompt tokens per step; "
                   "the prefills' (the decodes' when aggregated)")  # fmt: skip
    g.add_argument("--batches", type=int, nargs="+", help="decode max_num_seqs")
    p.add_argument("--out", help="write the best deployment's config here")
    p.add_argument("--validate", metavar="RESULTS_JSON",
                   help="a `baton bench` results.json of a stack run with --config")  # fmt: skip
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> None:
    from pathlib import Path

    from baton.bench.metrics import SLO
    from baton.bench.workloads import Dist
    from baton.config import to_toml
    from baton.plan import search, validate
    from baton.plan.simulate import Deployment, poisson_arrivals

    config = config_from(args)
    base = Deployment.from_config(config)
    if args.validate:  # the stack ran as its config says
        workers = base.num_prefill + base.num_decode
        profile = get_profile(
            args, config.engine, config.engine.threads or max(1, args.cores // workers)
        )
        print(f"deployment {base.split} from the config, replaying {args.validate}\n")
        try:
            comparisons = validate.compare(args.validate, profile, base)
        except (OSError, ValueError, KeyError) as e:  # JSONDecodeError is a ValueError
            raise SystemExit(f"bad results file {args.validate}: {e!r}") from e
        print(validate.report(comparisons))
        return

    if min(args.workers, args.cores, args.num_requests) < 1 or args.rate <= 0:
        raise SystemExit("--workers, --cores, --num-requests and --rate must be positive")
    try:  # before profiling: a typo should not cost a minute
        input_len, output_len = Dist.parse(args.input_len), Dist.parse(args.output_len)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    profile = get_profile(args, config.engine, max(1, args.cores // args.workers))
    arrivals = poisson_arrivals(args.rate, input_len, output_len, args.num_requests, args.seed)
    slo = SLO(config.slo.ttft_ms, config.slo.tpot_ms, config.slo.attainment)
    budgets, batches = tuple(args.budgets or search.BUDGETS), tuple(args.batches or search.BATCHES)
    ranked = search.search(
        profile, arrivals, slo, search.candidates(base, args.workers, budgets, batches)
    )
    print(
        f"{args.num_requests} requests at {args.rate:g} req/s, in {input_len} out {output_len}, "
        f"{args.workers} workers on {args.cores} cores; SLO TTFT <= {slo.ttft_ms:g} ms, "
        f"TPOT <= {slo.tpot_ms:g} ms for {slo.attainment:.0%}\n"
    )
    print(search.table(ranked, slo))
    best = ranked[0].deployment
    print(
        f"\nbest: {best.split}, token budget {best.token_budget}, max batch {best.decode_max_batch}"
    )
    if not ranked[0].summary["meets_attainment"]:
        print(f"no setting meets the SLO for {slo.attainment:.0%} of requests at this rate")
    if args.out:
        Path(args.out).write_text(to_toml(search.to_config(config, best, args.cores), redact=False))
        print(f"wrote {args.out}")


def get_profile(args: argparse.Namespace, engine: "EngineConfig", threads: int) -> "Profile":
    """--profile's, or one measured now on `threads` threads (saved to --profile-out)."""
    import msgspec

    from baton.plan.profile import Profile

    if args.profile:
        try:
            profile = Profile.load(args.profile)
        except (OSError, msgspec.DecodeError) as e:  # ValidationError is a DecodeError
            raise SystemExit(f"bad profile {args.profile}: {e}") from e
        if profile.threads != threads:
            print(f"warning: the profile was timed on {profile.threads} thread(s), "
                  f"each worker here gets {threads}", file=sys.stderr)  # fmt: skip
    else:
        from baton.plan.measure import measure

        try:
            profile = measure(engine, threads, log=lambda m: print(m, file=sys.stderr))
        except ValueError as e:  # a model too short for the profile's lengths
            raise SystemExit(str(e)) from e
    if args.profile_out:
        profile.save(args.profile_out)
    print(profile.describe() + "\n")
    return profile
