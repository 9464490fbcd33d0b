"""The pools' desired sizes (gateway/autoscale.py), from heartbeats and requests on a clock the
test moves: no model, no services."""

import asyncio

import pytest
from prometheus_client import REGISTRY

from baton import protocol as P
from baton.config import AutoscaleConfig, GatewayConfig, SLOConfig
from baton.gateway.admission import Admission
from baton.gateway.autoscale import Autoscaler
from baton.gateway.backend import Backend
from baton.gateway.router import Registry, Router

SLO = SLOConfig(ttft_ms=2000, tpot_ms=100)
# a prefill at ~1 ms a prompt token (1 ms per token, 10 ms a step of up to 512)
PREFILL = {"step_fixed_s": 0.01, "step_per_unit_s": 0.001, "step_budget": 512}
# a decode step: 20 ms + 2 ms a sequence; within 0.8 x 100 ms it runs 30 sequences
DECODE = {"step_fixed_s": 0.02, "step_per_unit_s": 0.002}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def service(sid: str, role: str, running: int = 0, used: int = 0, **load) -> P.Heartbeat:
    steps = PREFILL if role == "prefill" else DECODE
    addr = "tcp://127.0.0.1:1" if role == "decode" else ""
    return P.Heartbeat(sid, role, addr, P.Load(0, running, 1000 - used, 1000, **steps | load))


def pools(*heartbeats: P.Heartbeat) -> Registry:
    registry = Registry()
    for hb in heartbeats:
        registry.heartbeat(hb)
    return registry


def test_prefills_follow_the_prompt_tokens_asked_for_and_leave_one_at_a_time():
    clock = Clock()
    scaler = Autoscaler(
        SLO, AutoscaleConfig(window_s=30, down_after_s=60), headroom=0.7, clock=clock
    )
    registry = pools(service("p0", "prefill"), service("d0", "decode"))
    assert scaler.decide(registry) == {"prefill": 1, "decode": 1}
    # 2,000 prompt tokens a second for 30 s: ~2.04 prefill-seconds a second, over 0.7 of each
    for _ in range(60):
        scaler.demand(1000)
    assert scaler.decide(registry)["prefill"] == 3  # up at once
    clock.now += 31  # the demand has left the window
    assert scaler.decide(registry)["prefill"] == 3  # down only after 60 s of wanting less
    clock.now += 59
    assert scaler.decide(registry)["prefill"] == 3
    clock.now += 2
    assert scaler.decide(registry)["prefill"] == 2  # one at a time
    clock.now += 30
    assert scaler.decide(registry)["prefill"] == 2
    clock.now += 31
    assert scaler.decide(registry)["prefill"] == 1
    for _ in range(60):  # demand again before the next step down: back up at once
        scaler.demand(1000)
    assert scaler.decide(registry)["prefill"] == 3


def test_decodes_follow_the_sequences_they_run_within_tpot_and_the_kv_they_hold():
    scaler = Autoscaler(SLO, headroom=0.7, clock=Clock())
    # 50 sequences where one decode runs 30 within TPOT: 50 / 30 / 0.7 -> 3
    assert scaler.decide(pools(service("p0", "prefill"), service("d0", "decode", 50)))[
        "decode"
    ] == 3  # fmt: skip
    # few sequences, but 1,600 of 2,000 blocks in use: 1,600 / 1,000 / 0.7 -> 3
    registry = pools(service("d0", "decode", 2, used=800), service("d1", "decode", 2, used=800))
    assert Autoscaler(SLO, headroom=0.7, clock=Clock()).decide(registry)["decode"] == 3


def test_missing_the_slo_asks_for_one_more_whatever_the_fits_say():
    scaler = Autoscaler(SLO, clock=Clock())
    registry = pools(service("p0", "prefill"), service("d0", "decode"), service("d1", "decode"))
    for _ in range(9):  # too few to tell
        scaler.served(ttft_s=3.0, tpot_s=0.2)
    assert scaler.decide(registry) == {"prefill": 1, "decode": 2}
    scaler.served(ttft_s=3.0, tpot_s=0.2)
    assert scaler.decide(registry) == {"prefill": 2, "decode": 3}


def test_an_aggregated_stack_scales_its_decodes_on_prompt_work_too():
    scaler = Autoscaler(SLO, headroom=0.7, clock=Clock())
    # each decode computes 500 prompt tokens a second beside its batch; 1,000 are asked
    registry = pools(service("d0", "decode", prompt_rate=500.0))
    for _ in range(30):
        scaler.demand(1000)
    assert scaler.decide(registry) == {"prefill": 0, "decode": 3}  # 2 / 0.7


def test_offered_load_is_prompt_work_asked_over_what_the_stack_computes():
    clock = Clock()
    scaler = Autoscaler(SLO, AutoscaleConfig(window_s=30), clock=clock)
    # a prefill at 1 ms a token + 10 ms a step of 512 (~981 tokens a second), a decode at 500
    registry = pools(service("p0", "prefill"), service("d0", "decode", prompt_rate=500.0))
    assert scaler.offered_load(registry) == 0.0  # nothing asked
    scaler.demand(1480)
    # one request is no rate: over the shortest span, 5 s
    assert scaler.offered_load(registry) == pytest.approx(
        1480 / 5 / (1 / (0.001 + 0.01 / 512) + 500)
    )
    for _ in range(29):
        clock.now += 1
        scaler.demand(1480)
    assert scaler.offered_load(registry) == pytest.approx(30 * 1480 / 29 / 1480, rel=0.01)
    assert scaler.offered_load(pools(service("d0", "decode"))) == 0.0  # nothing measured
    clock.now += 60  # the window has passed
    assert scaler.offered_load(registry) == 0.0


def split_scaler(clock: Clock) -> Autoscaler:
    """Two services to split; a move once it has been wanted for 10 s."""
    config = AutoscaleConfig(max_services=2, window_s=30, down_after_s=10)
    return Autoscaler(SLO, config, headroom=0.7, clock=clock)


def test_a_fixed_number_of_services_splits_by_the_work_asked_and_moves_once_it_has_held():
    clock = Clock()
    scaler = split_scaler(clock)
    # aggregated: two decodes, each running 3 sequences of the 30 it runs within TPOT, and a
    # prompt token costing 1 ms beside their batches
    aggregated = pools(*(service(f"d{i}", "decode", 3, prompt_token_s=0.001) for i in range(2)))
    assert scaler.decide(aggregated) == {"prefill": 0, "decode": 2}  # nothing asked yet
    for _ in range(30):  # chat: 200-token prompts, one a second: 0.2 s of a core a second
        clock.now += 1
        scaler.demand(200)
        assert scaler.decide(aggregated) == {"prefill": 0, "decode": 2}  # the slack holds them
    clock.now += 30  # the chat has left the window
    # long prompts: 2,000 tokens take 2 s of a core, 3.2 s in the slack beside the batches
    # (0.7 x 1.8 cores' worth over 2), past the 2 s TTFT
    for _ in range(10):
        clock.now += 1
        scaler.demand(2000)
        assert scaler.decide(aggregated) == {"prefill": 0, "decode": 2}  # not held 10 s yet
    clock.now += 1
    assert scaler.decide(aggregated) == {"prefill": 1, "decode": 1}
    # split: the prefill's own fit now prices a token (~1 ms); the chat comes back
    split = pools(service("p0", "prefill"), service("d0", "decode", 6))
    clock.now += 30
    for _ in range(10):
        clock.now += 1
        scaler.demand(200)
        assert scaler.decide(split) == {"prefill": 1, "decode": 1}
    clock.now += 1
    assert scaler.decide(split) == {"prefill": 0, "decode": 2}


def test_a_split_waits_for_its_services_and_turns_toward_the_side_missing_the_slo():
    clock = Clock()
    scaler = split_scaler(clock)
    assert scaler.decide(pools(service("d0", "decode"))) == {"prefill": 0, "decode": 1}
    assert scaler.desired == {}  # still starting: nothing for `baton up` to act on
    aggregated = pools(service("d0", "decode", 1), service("d1", "decode", 1))
    scaler.demand(10)  # hardly any work: the fits want no prefill
    for _ in range(10):
        scaler.served(ttft_s=3.0, tpot_s=0.05)  # but TTFT alone misses
    scaler.decide(aggregated)
    clock.now += 10
    assert scaler.decide(aggregated) == {"prefill": 1, "decode": 1}
    clock.now += 30  # (the misses before the move no longer count after it)
    for _ in range(10):  # TPOT alone misses now: back to decoding
        scaler.served(ttft_s=0.1, tpot_s=0.5)
    split = pools(service("p0", "prefill"), service("d0", "decode", 1))
    scaler.decide(split)
    clock.now += 10
    assert scaler.decide(split) == {"prefill": 0, "decode": 2}


def test_the_gateway_exports_what_it_decides_each_reap():
    async def scenario() -> None:
        scaler = Autoscaler(SLO, headroom=0.7, clock=Clock())
        admission = Admission(GatewayConfig(), SLO)
        backend = Backend("tcp://127.0.0.1:0", admission, Router(), False, autoscaler=scaler)
        backend.registry.heartbeat(service("p0", "prefill"))
        backend.registry.heartbeat(service("d0", "decode", 50))
        backend.reap()
        want = {"prefill": 1, "decode": 3}
        for pool, count in want.items():
            assert REGISTRY.get_sample_value("baton_desired_replicas", {"pool": pool}) == count
        await backend.close()

    asyncio.run(scenario())
