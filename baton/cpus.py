"""CPU sets: the cores each pool of `baton up` is pinned to."""

import os


def parse_cpus(spec: str | None) -> set[int] | None:
    """'0', '0-3', '0,2' -> a CPU set; None/'' -> no pinning."""
    if not spec:
        return None
    cpus: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def default_cpus(
    role: str, aggregated: bool = False, allowed: set[int] | None = None
) -> str | None:
    """Of the CPUs this process may run on (`allowed`, by default its affinity: a cpuset or
    taskset may exclude some), with 2+, prefill gets the first half and decode the rest, so
    prefill never steals decode's cores; with no prefill pool, decode gets them all."""
    cpus = sorted(os.sched_getaffinity(0) if allowed is None else allowed)
    if len(cpus) < 2 or aggregated:
        return None
    half = len(cpus) // 2
    return ",".join(map(str, cpus[:half] if role == "prefill" else cpus[half:]))
