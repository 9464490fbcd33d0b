"""The KV hand-off streamed chunk by chunk vs sent once after the prefill, end to end.

    python -m baton.benchmarks.kv_stream_bench [--prompt-tokens 4096] [--requests 3]
                                         [--transports zmq-tcp shm nixl]

Per transport and `--stream-kv on|off`: `baton up` with one prefill and one decode, each
pinned to its own core (SmolLM2 bf16), then requests one at a time, each a fresh random
prompt (no prefix hits) and 8 new tokens. Per request:
- TTFT: the prefill alone (token 0 goes to the gateway before any KV moves);
- hand-off gap, token 0 -> token 1: the KV still to move when the prefill ends, plus one
  decode step; streaming leaves only the last chunk's blocks for it;
- step: the mean gap after that (one decode step), the floor of the hand-off gap.
Medians after one warm-up request. kv_transfer_bench.py times the transports alone.
"""

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from baton.bench.arms import Limits, baton_up, running
from baton.bench.client import complete, served_model
from baton.bench.metrics import RequestRecord
from baton.model.files import resolve_model_dir

NEW_TOKENS = 8


async def timed_requests(url: str, prompts: list[list[int]]) -> list[RequestRecord]:
    records = []
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(None)) as client:
        model = await served_model(client)
        for ids in prompts:
            rec = RequestRecord(0, 0, len(ids), NEW_TOKENS)
            await complete(client, model, ids, rec, time.perf_counter(), want_ids=False)
            if not rec.ok:
                raise RuntimeError(f"request failed: {rec.status} {rec.error}")
            records.append(rec)
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--transports", nargs="+", default=["zmq-tcp", "shm", "nixl"])
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--port", type=int, default=8460)
    args = ap.parse_args()
    limits = Limits(
        model=str(resolve_model_dir(None)),
        dtype="bfloat16",
        cpus=[0, 1],
        max_num_seqs=64,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_gib=1,
        max_model_len=args.prompt_tokens + NEW_TOKENS + 16,
    )
    rng = np.random.default_rng(7)
    rows = []
    for transport in args.transports:
        for stream in ("off", "on"):
            arm = baton_up("baton-disagg", limits, args.port, Path(tempfile.mkdtemp()))
            arm.start += ["--transport", transport, "--stream-kv", stream]
            prompts = rng.integers(3, 49152, (args.requests + 1, args.prompt_tokens)).tolist()
            with running(arm, Path(tempfile.mkdtemp()) / "up.log"):
                records = asyncio.run(timed_requests(arm.url, prompts))[1:]
            ttft = statistics.median(r.ttft_s for r in records)
            gap = statistics.median(r.itl_s[0] for r in records)
            step = statistics.median(statistics.mean(r.itl_s[1:]) for r in records)
            rows.append((transport, stream, ttft, gap, step))
            print(
                f"{transport} stream {stream}: ttft {ttft:.3f}s gap {gap * 1e3:.1f}ms", flush=True
            )
    print(f"\n{args.prompt_tokens}-token prompts, one at a time, {args.requests} each (medians)\n")
    print("| transport | streaming | TTFT ms | hand-off gap ms | decode step ms | gap - step ms |")
    print("|---|---|---|---|---|---|")
    for transport, stream, ttft, gap, step in rows:
        print(
            f"| {transport} | {stream} | {ttft * 1e3:.0f} | {gap * 1e3:.1f} | {step * 1e3:.1f} "
            f"| {(gap - step) * 1e3:.1f} |"
        )


if __name__ == "__main__":
    main()
