"""Chaos: 2 prefill + 2 decode under a steady stream of requests while a driver kills -9 and
restarts random services and clients walk away at random moments, all drawn from one seed.

Every stream completes token-exact against transformers (failover resumes the ones whose
service died) or ends with an error that says why; none goes STALL_S without a word; when the
load stops, every live service's KV blocks return to zero."""

import asyncio
import json
import os
import random
import signal
import subprocess
import time

import httpx
from reference import ENGINE, hf_greedy
from stack import Stack, get

NEW = 32
DEADLINE_S = 60
STALL_S = 10  # a stream that says nothing for this long has hung
SEED = int(os.environ.get("BATON_CHAOS_SEED", "20261206"))  # set it to replay another run


def test_kills_restarts_and_disconnects_under_load(tmp_path, tiny_text_model):
    print(f"chaos seed {SEED} (BATON_CHAOS_SEED)")
    rng = random.Random(SEED)
    prompts = [[rng.randrange(3, 49152) for _ in range(rng.randrange(4, 80))] for _ in range(64)]
    expected = hf_greedy(tiny_text_model, prompts, NEW)
    stack = Stack(tmp_path / "logs", tiny_text_model, *ENGINE, prefill=2, decode=2)
    services = {n: s for n, s in stack.services().items() if s["role"] != "gateway"}
    restarted: dict[str, subprocess.Popen] = {}
    outcome: dict[int, tuple[str, list[int], str]] = {}  # i -> (how it ended, tokens, error)
    kills = 0

    async def client(http: httpx.AsyncClient, i: int) -> None:
        body = {"prompt": prompts[i], "max_tokens": NEW, "temperature": 0, "ignore_eos": True,
                "stream": True, "return_token_ids": True}  # fmt: skip
        leave_after = rng.uniform(0.01, 1.0) if rng.random() < 0.2 else None
        tokens: list[int] = []
        loop = asyncio.get_running_loop()
        try:
            async with (
                asyncio.timeout(leave_after),
                asyncio.timeout(STALL_S) as stall,
                http.stream("POST", "/v1/completions", json=body) as r,
            ):
                async for line in r.aiter_lines():
                    stall.reschedule(loop.time() + STALL_S)
                    if line.startswith("data: {"):
                        msg = json.loads(line[6:])
                        if "error" in msg:
                            outcome[i] = ("error", tokens, msg["error"]["message"])
                            return
                        tokens += msg["choices"][0]["token_ids"]
                    elif line == "data: [DONE]":
                        outcome[i] = ("done", tokens, "")
                        return
            outcome[i] = ("cut", tokens, f"HTTP {r.status_code}")
        except TimeoutError:
            outcome[i] = ("hung" if stall.expired() else "left", tokens, "")

    async def chaos() -> None:
        """Kill and restart until the clients are done; a killed service always comes back."""
        nonlocal kills
        while len(outcome) < len(prompts):
            await asyncio.sleep(rng.uniform(1.0, 2.5))
            if len(outcome) == len(prompts):
                return
            name = rng.choice(sorted(services))
            pid = restarted[name].pid if name in restarted else services[name]["pid"]
            os.kill(pid, signal.SIGKILL)
            kills += 1
            await asyncio.sleep(rng.uniform(0.2, 1.0))
            log = (tmp_path / f"{name}-restart-{kills}.log").open("w")
            restarted[name] = subprocess.Popen(
                services[name]["argv"], stdout=log, stderr=subprocess.STDOUT
            )

    async def main() -> None:
        async with httpx.AsyncClient(base_url=stack.url, timeout=DEADLINE_S) as http:
            driver = asyncio.create_task(chaos())
            clients = []
            for i in range(len(prompts)):
                clients.append(asyncio.create_task(client(http, i)))
                await asyncio.sleep(rng.uniform(0.05, 0.25))
            async with asyncio.timeout(DEADLINE_S):  # no request hangs
                await asyncio.gather(*clients)
            await driver

    try:
        asyncio.run(main())
        ends = [how for how, _, _ in outcome.values()]
        migrations = stack.metric("gateway", "baton_migrations_total")
        print(f"chaos: {len(prompts)} requests, {kills} kills, {migrations:.0f} migrations, "
              f"{ends.count('done')} done, {ends.count('left')} left, "
              f"{ends.count('error')} failed: {[e for _, _, e in outcome.values() if e]}")  # fmt: skip
        assert len(outcome) == len(prompts)
        for i, (how, tokens, error) in outcome.items():
            assert how in ("done", "error", "left"), f"request {i}: {how} {error}"
            if how == "done":
                assert tokens == expected[i], f"request {i} diverged"
            elif how == "error":
                assert len(error) > 10, f"request {i}: a failure must say why, not {error!r}"
        assert ends.count("done") > len(prompts) // 2  # failover kept most streams alive

        def used() -> dict[str, int]:
            out = {}
            for name, s in services.items():
                try:
                    load = json.loads(get(f"{s['url']}/health", timeout=2)[1])["load"]
                except (OSError, ValueError, KeyError):
                    continue  # down at this moment (killed and not yet back)
                out[name] = load["total_blocks"] - load["free_blocks"]
            return out

        deadline = time.monotonic() + 60  # restarted services may still be loading
        while time.monotonic() < deadline:
            blocks = used()
            if len(blocks) == len(services) and set(blocks.values()) == {0}:
                break
            time.sleep(0.3)
        assert blocks == dict.fromkeys(services, 0)
    finally:
        for p in restarted.values():
            p.kill()
        stack.stop()
