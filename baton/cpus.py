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


def default_cpus(role: str, aggregated: bool = False) -> str | None:
    """On a machine with 2+ cores, prefill gets the first half and decode the rest, so
    prefill never steals decode's cores; with no prefill pool, decode gets them all."""
    n = len(os.sched_getaffinity(0))
    if n < 2 or aggregated:
        return None
    half = n // 2
    return f"0-{half - 1}" if role == "prefill" else f"{half}-{n - 1}"
