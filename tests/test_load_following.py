"""Cores that follow the load, end to end over `baton up`: a decode whose batch is full hands
new requests to a prefill that keeps and decodes them, a decode's core takes prompts when it
would finish them first, and both pace their prompt chunks to the TPOT target. Wherever a
request ran, its greedy tokens equal transformers'."""

import asyncio
import random
import time

import httpx
from reference import hf_greedy
from stack import Stack

SEED = 20261206
NEW = 16


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 49152) for _ in range(rng.choice([5, 20, 48, 70]))] for _ in range(n)]


async def complete_all(url: str, batch: list[list[int]]) -> list[list[int]]:
    body = {"max_tokens": NEW, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        rs = await asyncio.gather(
            *(client.post("/v1/completions", json={**body, "prompt": p}) for p in batch)
        )
    return [r.json()["choices"][0]["token_ids"] for r in rs]


def test_kept_and_stolen_requests_are_token_exact_and_paced(tmp_path, tiny_text_model):
    print("seed", SEED)
    config = tmp_path / "baton.toml"
    # a 1 ms TPOT target: a decode is full as soon as its step times are known, and every
    # prompt chunk beside a decoding sequence takes the fewest tokens (16)
    config.write_text("[slo]\ntpot_ms = 1\n")
    stack = Stack(tmp_path / "logs", tiny_text_model, "--config", str(config))
    try:
        warm, burst = prompts(4, SEED), prompts(12, SEED + 1)
        assert asyncio.run(complete_all(stack.url, warm)) == hf_greedy(tiny_text_model, warm, NEW)
        time.sleep(1.2)  # a heartbeat carries the decode's step times to the gateway
        got = asyncio.run(complete_all(stack.url, burst))
        assert got == hf_greedy(tiny_text_model, burst, NEW)
        routed = "baton_local_prefills_routed_total"
        assert stack.metric("gateway", routed, why="kept") > 0
        prefill = next(iter(stack.services("prefill")))
        assert stack.metric(prefill, "baton_request_errors_total") == 0
        assert set(stack.wait_blocks_free().values()) == {0}
    finally:
        stack.stop()
