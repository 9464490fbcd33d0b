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


def test_an_aggregated_pool_wants_prefills_only_for_long_prompts_beside_busy_batches():
    """No prefill pool (the HPA path: no max_services): 2,000-token prompts, 1 ms of a core
    each token, beside 3 sequences leave a decode 1.26 cores of slack, enough to compute one
    within TTFT (2 s): more decodes, no prefill. Beside 24 (1.6 cores' worth) the slack is 0.28
    of a core, 7 s a prompt: prefills of a decode's 2 cores for the 2 cores of prompt work. Chat
    (200-token prompts) beside the same batch fits its slack."""
    for running, tokens, prefills in ((3, 2000, 0), (24, 2000, 2), (24, 200, 0)):
        clock = Clock()
        scaler = Autoscaler(SLO, AutoscaleConfig(window_s=30), headroom=0.7, clock=clock)
        assert scaler.decide(aggregated(running))["prefill"] == 0  # nothing asked yet
        for _ in range(30):
            clock.now += 1
            scaler.demand(tokens)
        assert scaler.decide(aggregated(running))["prefill"] == prefills, (running, tokens)


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
    """Two cores to split; a move once it has been wanted for 10 s."""
    config = AutoscaleConfig(max_services=2, window_s=30, down_after_s=10)
    return Autoscaler(SLO, config, headroom=0.7, clock=clock)


def aggregated(running: int) -> Registry:
    """One decode on both cores; a prompt token adds 0.5 ms to its step (1 ms of a core)."""
    return pools(service("d0", "decode", running, threads=2, prompt_token_s=0.0005))


def ask(scaler: Autoscaler, clock: Clock, tokens: int, registry: Registry, seconds: int) -> None:
    """A prompt of `tokens` a second for `seconds` (and one before): the split stays as it
    was all along."""
    before = scaler.decide(registry)
    for _ in range(seconds):
        clock.now += 1
        scaler.demand(tokens)
        assert scaler.decide(registry) == before


def test_the_cores_split_only_where_a_prefill_pool_would_outdo_the_aggregated_slack():
    clock = Clock()
    scaler = split_scaler(clock)
    assert scaler.decide(aggregated(6)) == {"prefill": 0, "decode": 2}  # nothing asked yet
    # chat: 200-token prompts, one a second (0.2 of a core), beside 6 sequences (0.4 of the
    # cores' capacity within TPOT): the slack, 0.7 x 1.6 cores, computes them in time
    ask(scaler, clock, 200, aggregated(6), 30)
    clock.now += 30
    # 2,000-token prompts (2 s of a core each) beside few sequences: the aggregated engine
    # falls behind, but its slack (1.26 cores) outdoes the one core a prefill could have
    ask(scaler, clock, 2000, aggregated(3), 30)
    # beside 24 sequences (1.6 cores' worth) its slack is 0.28 of a core: a 2,000-token
    # prompt would take 7 s there, 2 s on a prefill's core. Wanted from now, taken after 10 s
    ask(scaler, clock, 2000, aggregated(24), 9)
    clock.now += 1
    assert scaler.decide(aggregated(24)) == {"prefill": 1, "decode": 1}
    # split, the prompts in progress on the prefill count as the decode work they were: 26
    # sequences leave 0.8 of a core's slack, and a prompt computes faster on the prefill's core
    busy = pools(service("p0", "prefill", 20, threads=1), service("d0", "decode", 6, threads=1))
    ask(scaler, clock, 2000, busy, 15)
    # split: the prefill's own fit prices a token now (~1 ms); the chat comes back
    split = pools(service("p0", "prefill", threads=1), service("d0", "decode", 6, threads=1))
    clock.now += 30
    ask(scaler, clock, 200, split, 9)
    clock.now += 1
    assert scaler.decide(split) == {"prefill": 0, "decode": 2}


def test_a_decode_at_its_batch_cap_has_no_slack_whatever_its_step_time():
    clock = Clock()
    scaler = split_scaler(clock)
    # 12 sequences, 12 of 30 within TPOT by its step time, but its max_num_seqs is 12: full
    full = pools(service("d0", "decode", 12, threads=2, prompt_token_s=0.0005, step_budget=12))
    ask(scaler, clock, 500, full, 10)  # (nothing asked at the first look)
    clock.now += 1
    assert scaler.decide(full) == {"prefill": 1, "decode": 1}


def test_the_split_is_in_shares_of_the_cores():
    clock = Clock()
    config = AutoscaleConfig(max_services=2, share_cores=2, window_s=30, down_after_s=10)
    scaler = Autoscaler(SLO, config, headroom=0.7, clock=clock)
    assert scaler.decide(pools(service("d0", "decode", threads=2))) == {}  # 2 of 4 cores
    full = pools(service("d0", "decode", 12, threads=4, prompt_token_s=0.0005, step_budget=12))
    ask(scaler, clock, 500, full, 10)
    clock.now += 1
    assert scaler.decide(full) == {"prefill": 1, "decode": 1}  # one share each


def test_a_split_waits_for_its_cores_and_turns_toward_the_side_missing_the_slo():
    clock = Clock()
    scaler = split_scaler(clock)
    # one core of two registered: nothing for `baton up` to act on yet
    assert scaler.decide(pools(service("d0", "decode", threads=1))) == {}
    scaler.demand(10)  # hardly any work: the fits want no prefill
    for _ in range(10):
        scaler.served(ttft_s=3.0, tpot_s=0.05)  # but TTFT alone misses
    ask(scaler, clock, 10, aggregated(1), 5)  # idle decodes: their slack outdoes a prefill
    ask(scaler, clock, 10, aggregated(15), 9)  # busy ones (0.7 of a core's slack): a prefill
    clock.now += 1
    assert scaler.decide(aggregated(15)) == {"prefill": 1, "decode": 1}
    clock.now += 30  # (the misses before the move no longer count after it)
    for _ in range(10):  # TPOT alone misses now: back to decoding
        scaler.served(ttft_s=0.1, tpot_s=0.5)
    split = pools(service("p0", "prefill", threads=1), service("d0", "decode", 1, threads=1))
    ask(scaler, clock, 10, split, 9)
    clock.now += 1
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
