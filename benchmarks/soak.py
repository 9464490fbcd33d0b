"""Soak: a 2P+2D `baton up` under steady load for minutes while a decode is killed -9 and
restarted every 30 s, a prefill every 90 s (--kill-every), and clients leave at random or stop
reading.

Prints, and writes to --out (JSON): requests ok / failed with an error that says why / hung
(a stream silent for STALL_S: must be 0); the longest gap between two chunks of any stream
that ended well; KV blocks in use on every service once the load stops (must be 0); RSS of
each process over its life (the gateway's over the whole run; a service's since its last
restart), from WARMUP_S after its start to its last sample, and one sample a minute.

    python -m baton.benchmarks.soak --minutes 20 --out benchmarks/results/soak.json
"""

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

STALL_S = 30.0  # a stream silent this long has hung
SETTLE_S = 60.0  # after the load: how long blocks may take to come back
WARMUP_S = 30  # RSS samples (one a second) of a process's start that are not growth


@dataclass
class Tally:
    ok: int = 0
    failed: int = 0  # an error event or status that says why
    hung: int = 0
    left: int = 0  # the client walked away (on purpose)
    stalled: int = 0  # the client stopped reading (on purpose)
    errors: dict[str, int] = field(default_factory=dict)
    longest_gap_s: float = 0.0  # between two chunks of a stream that ended well

    def error(self, why: str) -> None:
        self.failed += 1
        key = why[:120]
        self.errors[key] = self.errors.get(key, 0) + 1


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Soak:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rng = random.Random(args.seed)
        self.log_dir = Path(tempfile.mkdtemp(prefix="baton-soak-"))
        self.tally = Tally()
        self.kills = {"prefill": 0, "decode": 0}
        self.pids: dict[str, int] = {}
        self.rss: dict[tuple[str, int], list[int]] = {}  # (name, pid) -> samples (KiB)

    def start(self) -> None:
        port = socket.create_server(("127.0.0.1", 0)).getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-P", "-m", "baton.cli", "up", "--prefill", str(self.args.prefill),
               "--decode", str(self.args.decode), "--port", str(port),
               "--log-dir", str(self.log_dir / "logs"), *self.args.up]  # fmt: skip
        self.up_log = self.log_dir / "up.log"
        self.up = subprocess.Popen(cmd, stdout=self.up_log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while "Baton is up" not in self.up_log.read_text():
            if self.up.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the stack did not start:\n{self.up_log.read_text()[-3000:]}")
            time.sleep(0.5)
        self.manifest = json.loads((self.log_dir / "logs" / "stack.json").read_text())
        self.pids = {n: s["pid"] for n, s in self.manifest.items()}

    def stop(self) -> None:
        self.up.send_signal(signal.SIGTERM)
        try:
            self.up.wait(30)
        except subprocess.TimeoutExpired:
            self.up.kill()
        for pid in self.pids.values():  # the restarted ones are ours, not `baton up`'s
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    async def client(self, http: httpx.AsyncClient) -> None:
        rng = self.rng
        n_in, n_out = rng.randrange(16, self.args.max_prompt), rng.randrange(8, self.args.max_new)
        body = {"model": "", "prompt": [rng.randrange(100, 40000) for _ in range(n_in)],
                "max_tokens": n_out, "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
        leave = rng.uniform(0.1, 5.0) if rng.random() < 0.1 else None
        if rng.random() < 0.05:
            return await self.stop_reading(body)
        loop = asyncio.get_running_loop()
        last = loop.time()
        gap = 0.0
        try:
            async with (
                asyncio.timeout(leave),
                asyncio.timeout(STALL_S) as stall,
                http.stream("POST", "/v1/completions", json=body) as r,
            ):
                if r.status_code != 200:
                    await r.aread()
                    self.tally.error(f"HTTP {r.status_code}: {r.text[:80]}")
                    return
                async for line in r.aiter_lines():
                    now = loop.time()
                    gap, last = max(gap, now - last), now
                    stall.reschedule(now + STALL_S)
                    if line.startswith("data: {") and '"error"' in line:
                        self.tally.error(json.loads(line[6:])["error"]["message"])
                        return
                    if line == "data: [DONE]":
                        self.tally.ok += 1
                        self.tally.longest_gap_s = max(self.tally.longest_gap_s, gap)
                        return
            self.tally.error("the stream ended without [DONE]")
        except TimeoutError:
            if leave is not None and not stall.expired():
                self.tally.left += 1
            else:
                self.tally.hung += 1
        except httpx.HTTPError as e:
            self.tally.error(f"{type(e).__name__}: {e}")

    async def stop_reading(self, body: dict) -> None:
        """A client that sends its request, then reads nothing and keeps the connection."""
        host, port = self.url.removeprefix("http://").split(":")
        data = json.dumps({**body, "max_tokens": self.args.max_new, "logprobs": 5}).encode()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_connect(sock, (host, int(port)))
            head = f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
            await loop.sock_sendall(sock, head.encode() + data)
            await asyncio.sleep(60)
            self.tally.stalled += 1
        finally:
            sock.close()

    def restart(self, name: str) -> None:
        os.kill(self.pids[name], signal.SIGKILL)
        time.sleep(self.rng.uniform(0.2, 1.0))
        log = (self.log_dir / f"{name}-restart.log").open("a")
        proc = subprocess.Popen(self.manifest[name]["argv"], stdout=log, stderr=subprocess.STDOUT)
        self.pids[name] = proc.pid
        self.kills[self.manifest[name]["role"]] += 1

    async def chaos(self, until: float) -> None:
        names = {r: sorted(n for n, s in self.manifest.items() if s["role"] == r)
                 for r in ("prefill", "decode")}  # fmt: skip
        loop = asyncio.get_running_loop()
        every = {"decode": self.args.kill_every[0], "prefill": self.args.kill_every[1]}
        start, next_at = loop.time(), dict(every)
        while loop.time() < until:
            await asyncio.sleep(1.0)
            self.sample_rss()
            for role in ("decode", "prefill"):
                if names[role] and every[role] and loop.time() - start >= next_at[role]:
                    next_at[role] += every[role]
                    name = names[role][self.kills[role] % len(names[role])]
                    await asyncio.to_thread(self.restart, name)

    def sample_rss(self) -> None:
        for name, pid in self.pids.items():
            if (kib := rss_kib(pid)) is not None:
                self.rss.setdefault((name, pid), []).append(kib)

    async def blocks_in_use(self) -> dict[str, int]:
        out = {}
        async with httpx.AsyncClient(timeout=5) as http:
            for name, s in self.manifest.items():
                if s["role"] == "gateway":
                    continue
                try:
                    load = (await http.get(f"{s['url']}/health")).json()["load"]
                    out[name] = load["total_blocks"] - load["free_blocks"]
                except (httpx.HTTPError, KeyError, ValueError) as e:
                    out[name] = f"unreadable: {e}"
        return out

    async def run(self) -> dict:
        loop = asyncio.get_running_loop()
        until = loop.time() + self.args.minutes * 60
        clients: set[asyncio.Task] = set()
        async with httpx.AsyncClient(base_url=self.url, timeout=None) as http:
            driver = asyncio.create_task(self.chaos(until))
            while loop.time() < until:
                task = asyncio.create_task(self.client(http))
                clients.add(task)
                task.add_done_callback(clients.discard)
                await asyncio.sleep(self.rng.expovariate(self.args.rate))
            await driver
            if clients:
                await asyncio.wait(clients, timeout=STALL_S + 70)
        settle = loop.time() + SETTLE_S
        while any((used := await self.blocks_in_use()).values()) and loop.time() < settle:
            await asyncio.sleep(1.0)
        self.sample_rss()
        # from WARMUP_S into each process's samples (a restarted one is loading its model
        # before), to the last
        rss = {f"{name} (pid {pid})": {"first_mib": s[WARMUP_S] / 1024, "last_mib": s[-1] / 1024,
                                       "growth": s[-1] / s[WARMUP_S] - 1, "seconds": len(s),
                                       "each_minute_mib": [round(k / 1024) for k in s[::60]]}
               for (name, pid), s in self.rss.items() if len(s) >= WARMUP_S + 10}  # fmt: skip
        return {"minutes": self.args.minutes, "rate": self.args.rate, "seed": self.args.seed,
                "kills": self.kills, "tally": self.tally.__dict__, "blocks_in_use": used,
                "rss": rss, "logs": str(self.log_dir)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=20)
    p.add_argument("--rate", type=float, default=1.0, help="requests a second (Poisson)")
    p.add_argument("--prefill", type=int, default=2)
    p.add_argument("--decode", type=int, default=2)
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--max-new", type=int, default=128)
    p.add_argument(
        "--kill-every",
        type=float,
        nargs=2,
        default=[30.0, 90.0],
        metavar=("DECODE_S", "PREFILL_S"),
        help="seconds between kills; 0: never",
    )
    p.add_argument("--seed", type=int, default=20261207)
    p.add_argument("--out", help="write the figures here (JSON)")
    p.add_argument("up", nargs="*", help="more `baton up` flags, after --")
    args = p.parse_args()
    print(f"soak seed {args.seed}", flush=True)
    soak = Soak(args)
    soak.start()
    try:
        result = asyncio.run(soak.run())
    finally:
        soak.stop()
    t = result["tally"]
    print(f"{'requests ok':<28}{t['ok']:>8}\n{'failed, with a reason':<28}{t['failed']:>8}\n"
          f"{'hung (must be 0)':<28}{t['hung']:>8}\n{'left / stopped reading':<28}"
          f"{t['left']:>4} / {t['stalled']}\n{'longest gap of an ok stream':<28}"
          f"{t['longest_gap_s']:>7.1f}s\n{'kills (prefill, decode)':<28}"
          f"{result['kills']['prefill']:>4}, {result['kills']['decode']}")  # fmt: skip
    print("blocks in use after the load (must be 0):", result["blocks_in_use"])
    for name, r in result["rss"].items():
        print(f"  RSS {name:<28} {r['first_mib']:7.0f} -> {r['last_mib']:7.0f} MiB "
              f"({r['growth']:+.1%} over its last {r['seconds'] - WARMUP_S} s)")  # fmt: skip
    for why, n in sorted(t["errors"].items(), key=lambda x: -x[1]):
        print(f"  {n:>4} x {why}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
