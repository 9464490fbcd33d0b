"""The KV hand-off between two hosts, end to end: a prefill and a decode on separate hosts
(baton.bench.hosts: network namespaces on a bridge; root only), per transport.

    python -m baton.benchmarks.hosts_handoff_bench [--transports nixl zmq-tcp] [--reps 8]

SmolLM2 bf16, the prefill pinned to core 0 and the decode to core 1, one thread each, the
hand-off after the whole prompt (stream_kv off) so it is not hidden behind the prefill. Per
prompt length: the median latency of max_tokens=1 (the prefill alone: its first token ends
the request there) and of max_tokens=2 (the prefill, the hand-off of every block, one decode
step); their difference is what the hand-off adds.
"""

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from baton.bench.hosts import Hosts

CONFIG = """transport = "{transport}"
stream_kv = false
[engine]
dtype = "bfloat16"
num_blocks = 1024
[prefill]
max_num_batched_tokens = 2048
[gateway]
busy_prefill_tokens = 0
local_prefill_tokens = 0
cached_prefill_tokens = 0
"""


def serve(root: Path, transport: str) -> tuple[Hosts, str]:
    """Gateway, prefill and decode on three hosts; the gateway's URL once both registered."""
    keys, config = root / "keys", root / "baton.toml"
    baton = [sys.executable, "-P", "-m", "baton.cli"]
    subprocess.run([*baton, "keys", str(keys)], check=True, capture_output=True)
    config.write_text(CONFIG.format(transport=transport))
    common = ["--config", str(config), "--key-dir", str(keys)]
    service = [*common, "--gateway", "tcp://gateway:5555", "--threads", "1"]
    hosts = Hosts(root, ["gateway", "prefill-0", "decode-0"])
    hosts.run("gateway", [*baton, "gateway", *common, "--host", "0.0.0.0",
                          "--zmq-addr", "tcp://0.0.0.0:5555"])  # fmt: skip
    hosts.run("prefill-0", ["taskset", "-c", "0", *baton, "prefill", *service])
    hosts.run("decode-0", ["taskset", "-c", "1", *baton, "decode", *service,
                           "--kv-addr", "tcp://0.0.0.0:6000"])  # fmt: skip
    url = f"http://{hosts.hosts['gateway']}:8000"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return hosts, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            hosts.close()
            raise RuntimeError(f"the stack did not come up: {root}")
        time.sleep(0.5)


def latency(client: httpx.Client, url: str, model: str, ids: list[int], max_tokens: int) -> float:
    body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0}  # fmt: skip
    t = time.perf_counter()
    r = client.post(f"{url}/v1/completions", json=body)
    r.raise_for_status()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transports", nargs="+", default=["nixl", "zmq-tcp"])
    ap.add_argument("--prompts", type=int, nargs="+", default=[500, 2000])
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    print("seed", args.seed)
    rows = []
    for transport in args.transports:
        with tempfile.TemporaryDirectory() as tmp:
            hosts, url = serve(Path(tmp), transport)
            try:
                with httpx.Client(timeout=120) as client:
                    model = client.get(f"{url}/v1/models").json()["data"][0]["id"]
                    rng = random.Random(args.seed)
                    for n in args.prompts:
                        times = {1: [], 2: []}
                        for _ in range(args.reps + 1):  # the first of each: a warm-up
                            for k in times:  # a prompt of its own: no prefix cache hit
                                ids = [rng.randrange(100, 40000) for _ in range(n)]
                                times[k].append(latency(client, url, model, ids, k))
                        p1, p2 = (statistics.median(times[k][1:]) for k in (1, 2))
                        rows.append((transport, n, p1, p2))
            finally:
                hosts.close()
    print(
        "| transport | prompt tokens | KV MiB | prefill only (s) | + hand-off + 1 step (s) | added (ms) |"
    )
    print("|---|---|---|---|---|---|")
    for transport, n, p1, p2 in rows:
        mib = n * 30 * 2 * 3 * 64 * 2 / 2**20  # SmolLM2: 30 layers, K and V, 3 heads of 64, bf16
        print(f"| {transport} | {n} | {mib:.0f} | {p1:.3f} | {p2:.3f} | {(p2 - p1) * 1e3:.0f} |")


if __name__ == "__main__":
    main()
