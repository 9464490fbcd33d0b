"""KV bytes a hand-off moves on a model with sliding-window layers (issue 24): a Gemma-3-shaped
model (random weights, SmolLM2's size: 30 layers of 576, 3 KV heads of 64; 5 sliding layers of
512 positions to each global one, as Gemma 3), served by `baton up` as 1 prefill + 1 decode on
one host, per transport.

    python -m baton.benchmarks.window_handoff_bench [--transports shm nixl zmq-ipc] [--prompts 1024 4096]

Per prompt length: the decode's `baton_kv_bytes_received_total` for one prompt, against the
bytes of all its blocks (what a hand-off read before it left out what the sliding layers no
longer see), and the median latency of max_tokens=1 (the prefill alone) and 2 (the prefill,
the hand-off, one decode step). The stack runs bf16 with its prefill and decode on one core
each, the hand-off after the whole prompt (stream_kv off).
"""

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from baton.model.files import resolve_model_dir

LAYERS, WINDOW, BLOCK = 30, 512, 16
CONFIG = """transport = "{transport}"
stream_kv = false
[engine]
dtype = "bfloat16"
num_blocks = 2048
[prefill]
max_num_batched_tokens = 1024
[gateway]
busy_prefill_tokens = 0
local_prefill_tokens = 0
cached_prefill_tokens = 0
"""


def gemma3_shaped(root: Path) -> Path:
    """A random Gemma 3 text model of SmolLM2's size, with SmolLM2's tokenizer."""
    smollm2 = resolve_model_dir(None)
    config = Gemma3TextConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=LAYERS,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, sliding_window=WINDOW,
        layer_types=["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(LAYERS)],
        max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).to(torch.bfloat16)
    out = root / "gemma3-shaped"
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2 / name).exists():
            (out / name).write_bytes((smollm2 / name).read_bytes())
    return out


def serve(root: Path, model: Path, transport: str) -> tuple[subprocess.Popen, str, str]:
    """The stack; its gateway's URL and the decode's probe URL once both registered."""
    config = root / f"{transport}.toml"
    config.write_text(CONFIG.format(transport=transport))
    logs = root / f"logs-{transport}"
    argv = [sys.executable, "-P", "-m", "baton.cli", "up", "--config", str(config),
            "--model", str(model), "--port", "8711", "--log-dir", str(logs),
            "--prefill", "1", "--decode", "1", "--prefill-cpus", "0", "--decode-cpus", "1"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url, deadline = "http://127.0.0.1:8711", time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                stack = json.loads((logs / "stack.json").read_text())
                return proc, url, stack["decode-0"]["url"]
        except (httpx.HTTPError, OSError, KeyError):
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.terminate()
            raise RuntimeError(f"the stack did not come up: {logs}")
        time.sleep(0.5)


def received(client: httpx.Client, probe: str) -> float:
    for line in client.get(f"{probe}/metrics").text.splitlines():
        if line.startswith("baton_kv_bytes_received_total"):
            return float(line.split()[-1])
    return 0.0


def latency(client: httpx.Client, url: str, ids: list[int], max_tokens: int) -> float:
    body = {"prompt": ids, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    t = time.perf_counter()
    client.post(f"{url}/v1/completions", json=body).raise_for_status()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transports", nargs="+", default=["shm", "nixl", "zmq-ipc"])
    ap.add_argument("--prompts", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    print("seed", args.seed)
    # every block: 30 layers x K and V x 16 tokens x 3 heads x 64 dims x 2 bytes
    block_nbytes = LAYERS * 2 * BLOCK * 3 * 64 * 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = gemma3_shaped(Path(tmp))
        for transport in args.transports:
            proc, url, probe = serve(Path(tmp), model, transport)
            try:
                with httpx.Client(timeout=300) as client:
                    rng = random.Random(args.seed)
                    for n in args.prompts:
                        times: dict[int, list[float]] = {1: [], 2: []}
                        moved = []
                        for _ in range(args.reps + 1):  # the first of each: a warm-up
                            for k in times:  # a prompt of its own: no prefix cache hit
                                ids = [rng.randrange(100, 40000) for _ in range(n)]
                                before = received(client, probe)
                                times[k].append(latency(client, url, ids, k))
                                if k == 2:
                                    moved.append(received(client, probe) - before)
                        p1, p2 = (statistics.median(times[k][1:]) for k in (1, 2))
                        whole = -(-n // BLOCK) * block_nbytes
                        rows.append((transport, n, moved[-1], whole, p1, p2))
            finally:
                proc.terminate()
                proc.wait(60)
    print("| transport | prompt tokens | KV read MiB | all its blocks MiB | x fewer bytes "
          "| prefill only (s) | + hand-off + 1 step (s) | added (ms) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for transport, n, moved, whole, p1, p2 in rows:
        print(f"| {transport} | {n} | {moved / 2**20:.1f} | {whole / 2**20:.1f} | "
              f"{whole / max(moved, 1):.2f} | {p1:.3f} | {p2:.3f} | {(p2 - p1) * 1e3:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
