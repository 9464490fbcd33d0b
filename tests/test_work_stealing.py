"""Cores that follow the load, as the gateway routes (no model, no services): a decode's core
takes a prompt it would finish before every prefill, a prefill keeps a request while every
decode is full."""

import asyncio

import msgspec
import pytest
from gateway_harness import busy_prefill, gateway, heartbeat, prompt, send, why

from baton import protocol as P
from baton.gateway.admission import Overloaded
from baton.gateway.backend import Backend
from baton.gateway.router import Why
from baton.sampling_params import SamplingParams


def test_a_decode_core_takes_a_prompt_it_would_finish_before_every_prefill():
    async def scenario() -> None:
        backend = gateway(("prefill-0", "prefill"), ("decode-0", "decode"), busy_prefill_tokens=800)
        registry = backend.registry
        # the decode computes 500 prompt tokens a second beside its batch: 100 take 0.2 s
        registry.heartbeat(heartbeat("decode-0", "decode", prompt_rate=500.0))
        registry.heartbeat(busy_prefill(0))
        assert why(backend, prompt(100)) is Why.REMOTE  # 0.11 s at the idle prefill
        registry.heartbeat(busy_prefill(200))  # 0.31 s there now
        assert why(backend, prompt(100)) is Why.STOLEN
        assert why(backend, prompt(801)) is Why.REMOTE  # longer than a decode may take
        # its own prompts count until their first tokens come back (or they end)
        stream = await send(backend, prompt(50))
        decode = registry.services["decode-0"]
        assert stream.prefill_id == stream.decode_id == "decode-0"
        assert decode.local_tokens == 50
        # its scheduler computes that one first (a prompt per step, as it reports)
        registry.heartbeat(heartbeat("decode-0", "decode", prompt_rate=500.0, ahead_tokens=50))
        assert why(backend, prompt(100)) is Why.STOLEN  # 150 tokens: 0.30 s < 0.31 s
        assert why(backend, prompt(120)) is Why.REMOTE  # 170 tokens: 0.34 s > 0.33 s
        await backend.finish(stream)
        assert decode.local_tokens == 0
        # before the decode has computed a prompt, half the prefill's speed is assumed
        registry.heartbeat(heartbeat("decode-0", "decode"))
        assert why(backend, prompt(100)) is Why.STOLEN  # 0.2 s again
        registry.heartbeat(busy_prefill(50))  # 0.16 s there
        assert why(backend, prompt(100)) is Why.REMOTE
        await backend.close()

    asyncio.run(scenario())


def test_stolen_prompts_of_one_request_queue_on_one_core_and_a_restart_drops_them():
    async def scenario() -> None:
        backend = gateway(("decode-0", "decode"), busy_prefill_tokens=800)
        registry = backend.registry
        registry.heartbeat(heartbeat("decode-0", "decode", prompt_rate=500.0))
        registry.heartbeat(busy_prefill(200))
        # alone, each would be done sooner on the decode (0.2 s < 0.31 s); the second queues
        # behind the first there (0.4 s) and goes to the prefill
        half = prompt(100)
        placements = backend.admit([half, half]).placements
        assert [p.why for p in placements] == [Why.STOLEN, Why.REMOTE]
        assert placements[0].prefill is None and placements[1].prefill.id == "prefill-0"
        stream = await backend.submit(placements[0], half, SamplingParams(max_tokens=4))
        assert registry.services["decode-0"].local_tokens == len(half)
        # the decode restarts: its stolen prompt died with it, and the successor starts at 0
        restarted = P.Heartbeat("decode-0", "decode", "tcp://127.0.0.1:1", P.Load(0, 0, 64, 64))
        restarted = msgspec.structs.replace(restarted, incarnation="again")
        backend.fail_requests(registry.heartbeat(restarted))
        await backend.finish(stream)
        assert registry.services["decode-0"].local_tokens == 0
        await backend.close()

    asyncio.run(scenario())


def test_a_stolen_prompt_that_would_miss_the_ttft_target_behind_others_is_refused():
    async def scenario() -> None:
        backend = gateway(("prefill-0", "prefill"), ("decode-0", "decode"), busy_prefill_tokens=800)
        registry = backend.registry
        registry.heartbeat(heartbeat("decode-0", "decode", prompt_rate=100.0))
        registry.heartbeat(busy_prefill(5000))  # 5.8 s at the prefill
        # alone on the decode it is taken, however late (an idle core takes any prompt)
        stream = await send(backend, prompt(400))  # 4 s there
        assert stream.prefill_id == "decode-0"
        registry.heartbeat(heartbeat("decode-0", "decode", prompt_rate=100.0, ahead_tokens=400))
        with pytest.raises(Overloaded, match="time to first token"):
            backend.admit([prompt(100)])  # 5 s behind it: over 0.85 x 2 s, and still stolen
        await backend.finish(stream)
        registry.heartbeat(heartbeat("decode-0", "decode", prompt_rate=100.0))
        assert backend.admit([prompt(100)]).placements[0].why is Why.STOLEN  # 1 s: in time
        await backend.close()

    asyncio.run(scenario())


def test_below_capacity_a_stolen_prompt_late_behind_a_short_queue_is_taken_not_refused():
    async def scenario(backend: Backend) -> None:
        registry = backend.registry
        registry.heartbeat(busy_prefill(5000))  # 5.8 s at the prefill: the decode's core steals
        # 100 tokens queued on the decode's core at 100 a second: a 150-token prompt is done in
        # 2.5 s, past 0.85 x 2 s, but late by a queue (1 s) shorter than the target
        stream = await send(backend, prompt(100))
        registry.heartbeat(heartbeat("decode-0", "decode", prompt_rate=100.0, ahead_tokens=100))
        placement = backend.admit([prompt(150, 1000)]).placements[0]  # the stack keeps up: taken
        assert placement.why is Why.STOLEN and placement.wait_s == pytest.approx(2.5)
        for _ in range(40):  # 40 x 150 asked within the shortest span: past what it computes
            backend.autoscaler.demand(150)
        with pytest.raises(Overloaded, match="time to first token"):
            backend.admit([prompt(150, 3000)])
        await backend.finish(stream)

    async def closing() -> None:
        backend = gateway(("prefill-0", "prefill"), ("decode-0", "decode"), busy_prefill_tokens=800)
        backend.admission.keeping_up_below = 0.9  # [gateway] admission_load (off by default)
        try:
            await scenario(backend)
        finally:
            await backend.close()  # an open socket would hang the test instead of failing it

    asyncio.run(closing())


def test_a_prefill_keeps_a_request_to_decode_while_every_decode_is_full():
    async def scenario() -> None:
        backend = gateway(("prefill-0", "prefill"), ("decode-0", "decode"))
        registry = backend.registry
        # a decode step of 19 ms + 2 ms a sequence: 30 take 79 ms, within 0.8 x the 100 ms
        # TPOT target; 31 take 81 ms
        steps = {"step_fixed_s": 0.019, "step_per_unit_s": 0.002}
        registry.heartbeat(heartbeat("decode-0", "decode", **steps))
        registry.heartbeat(busy_prefill(0))
        streams = [await send(backend, prompt(8, 100 * i)) for i in range(29)]
        assert why(backend, prompt(8)) is Why.REMOTE  # the 30th fits
        streams.append(await send(backend, prompt(8)))
        placement = backend.router.place([prompt(8)])[0]
        assert placement.why is Why.KEPT and placement.decode.id == "prefill-0"
        kept = await send(backend, prompt(8))
        assert kept.prefill_id == kept.decode_id == "prefill-0"
        assert registry.services["prefill-0"].kept == 1
        # a prefill keeps requests only with at most a step of prompts queued
        registry.heartbeat(busy_prefill(600))
        assert why(backend, prompt(8)) is Why.REMOTE
        await backend.finish(kept)
        assert registry.services["prefill-0"].kept == 0
        for stream in streams:
            await backend.finish(stream)
        await backend.close()

    asyncio.run(scenario())


def test_with_work_stealing_off_a_busy_prefill_still_takes_every_prompt():
    async def scenario() -> None:
        backend = gateway(("decode-0", "decode"))
        backend.registry.heartbeat(heartbeat("prefill-0", "prefill", queued_tokens=500))
        assert why(backend, prompt(1)) is Why.REMOTE
        await backend.close()

    asyncio.run(scenario())
