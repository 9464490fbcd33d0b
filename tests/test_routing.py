"""The gateway's routing decisions, on a registry fed by heartbeats (no model, no services):
where a prompt prefills and which decode takes it, counting what was sent, failures."""

import asyncio
import os
import time

import msgspec
import pytest
import zmq
from gateway_harness import gateway, heartbeat, prompt, send, why
from prometheus_client import REGISTRY

from baton import protocol as P
from baton.cpus import default_cpus
from baton.gateway import metrics as M
from baton.gateway.admission import Overloaded
from baton.gateway.backend import ServiceFailed
from baton.gateway.openai_types import BadRequest
from baton.gateway.router import NoCapacity, Why, prefill_cost
from baton.sampling_params import SamplingParams


def test_prompts_sent_after_a_heartbeats_snapshot_count_until_a_heartbeat_counts_them():
    """A heartbeat carries a load snapshot taken up to a period before it arrives: the
    prompts sent since must still weigh on admission and routing."""

    async def scenario() -> None:
        backend = gateway(("prefill-0", "prefill"), ("decode-0", "decode"))
        registry = backend.registry
        prefill = registry.services["prefill-0"]
        # nobody is there to take it (the send fails): not counted as sent, so it cannot
        # shift the count the prefill's heartbeats are matched against
        await send(backend, prompt(50))
        registry.heartbeat(heartbeat("prefill-0", "prefill"))
        assert prefill_cost(prefill) == 0
        ctx = zmq.Context()
        link = ctx.socket(zmq.DEALER)  # the prefill's end of its gateway link
        link.setsockopt(zmq.IDENTITY, b"prefill-0")
        link.connect(backend.addr)
        async with asyncio.timeout(10):  # until connected: the gateway can route to it by name
            while not await backend._send("prefill-0", P.Abort("probe")):
                await asyncio.sleep(0.05)
        for n in (100, 200):
            await send(backend, prompt(n))
        assert prefill_cost(prefill) == 300
        # taken after the first prompt arrived, before the second: that one still counts
        registry.heartbeat(heartbeat("prefill-0", "prefill", queued_tokens=100, requests_seen=1))
        assert prefill_cost(prefill) == 100 + 200
        registry.heartbeat(heartbeat("prefill-0", "prefill", queued_tokens=0, requests_seen=2))
        assert prefill_cost(prefill) == 0
        await backend.close()
        ctx.destroy(linger=0)

    asyncio.run(scenario())


def test_a_turn_goes_to_the_decode_that_holds_its_prefix_when_little_of_it_is_new():
    async def scenario() -> None:
        services = ("prefill-0", "prefill"), ("decode-0", "decode"), ("decode-1", "decode")
        backend = gateway(*services, cached_prefill_tokens=40, block_size=16)
        registry = backend.registry
        turn1 = prompt(200, 100)  # handed off
        stream = await send(backend, turn1)
        assert stream.prefill_id == "prefill-0"
        answer = prompt(8, 900)
        await backend.finish(stream, turn1 + answer)  # its decode now caches turn1 + answer
        # 36 new tokens after the 12 full blocks held (the answer's last token was sampled,
        # never fed: its block is not full)
        turn2 = turn1 + answer + prompt(20, 5000)
        (placement,) = backend.router.place([turn2])
        assert (placement.decode.id, placement.why) == (stream.decode_id, Why.CACHED)
        stream2 = await send(backend, turn2)
        assert stream2.prefill_id == stream2.decode_id == stream.decode_id
        # too much new, a prefix nobody holds, or its decode avoided: handed off as usual
        assert why(backend, turn1 + prompt(100, 5000)) is Why.REMOTE
        assert why(backend, prompt(200, 7000)) is Why.REMOTE
        assert why(backend, turn2, avoid={stream.decode_id}) is Why.REMOTE
        # a decode that died took its cache with it
        backend.fail_requests(registry.services[stream.decode_id])
        assert why(backend, turn2) is Why.REMOTE
        await backend.close()

    asyncio.run(scenario())


def test_a_request_is_placed_once_decode_first_and_counted_until_it_is_sent():
    """Admission places every prompt, decode first, and counts it on both services at once:
    the prompts of one request spread over the pools, and the next admission sees them before
    any is sent; sending uncounts it (a heartbeat forgets one never sent)."""

    async def scenario() -> None:
        services = [(f"{role}-{i}", role) for role in ("prefill", "decode") for i in (0, 1)]
        backend = gateway(*services)
        registry = backend.registry
        first = backend.admit([prompt(100), prompt(100)]).placements
        assert {(p.decode.id, p.prefill.id) for p in first} == {
            ("decode-0", "prefill-0"),
            ("decode-1", "prefill-1"),
        }
        assert all(p.why is Why.REMOTE for p in first)
        (second,) = backend.admit([prompt(30)]).placements  # both are as loaded now
        assert registry.services["prefill-0"].reserved_tokens == 100 + 30
        assert second.decode.reserved_requests == 2
        for placement, ids in ((first[0], prompt(100)), (second, prompt(30))):
            stream = await backend.submit(placement, ids, SamplingParams(max_tokens=4))
            assert stream.req_id in registry.services[stream.decode_id].requests
        assert second.decode.reserved_requests == 0
        registry.heartbeat(heartbeat("decode-1", "decode"))
        assert registry.services["decode-1"].reserved_requests == 0
        await backend.close()

    asyncio.run(scenario())


def test_with_no_decode_nothing_is_placed_and_a_429_reserves_nothing():
    async def scenario() -> None:
        backend = gateway(("prefill-0", "prefill"), max_queued=2)
        with pytest.raises(NoCapacity, match="no decode service"):
            backend.admit([prompt(10)])
        backend.registry.heartbeat(heartbeat("decode-0", "decode"))
        before = backend.admit([prompt(10)])  # one in flight
        reserved = [
            (s.reserved_tokens, s.reserved_requests) for s in backend.registry.services.values()
        ]
        with pytest.raises(Overloaded):
            backend.admit([prompt(10), prompt(10)])
        with pytest.raises(BadRequest, match="3 prompts in one request; at most 2"):
            backend.admit([prompt(10)] * 3)  # never servable: not a 429
        assert reserved == [
            (s.reserved_tokens, s.reserved_requests) for s in backend.registry.services.values()
        ]
        backend.release(before)
        backend.release(before)  # once is all it counts
        assert backend.inflight == 0 and backend.admit([prompt(10), prompt(10)])
        await backend.close()

    asyncio.run(scenario())


def test_a_placement_whose_service_left_before_the_send_is_made_again():
    async def scenario() -> None:
        services = ("prefill-0", "prefill"), ("prefill-1", "prefill"), ("decode-0", "decode")
        backend = gateway(*services)
        (placement,) = backend.admit([prompt(100)]).placements
        gone = placement.prefill.id
        del backend.registry.services[gone]  # it stopped heartbeating
        stream = await backend.submit(placement, prompt(100), SamplingParams(max_tokens=4))
        assert stream.prefill_id not in (gone, "decode-0")
        # with no prefill left at all, its decode prefills it
        (placement,) = backend.admit([prompt(100)]).placements
        for sid in ("prefill-0", "prefill-1"):
            backend.registry.services.pop(sid, None)
        stream = await backend.submit(placement, prompt(100), SamplingParams(max_tokens=4))
        assert stream.prefill_id == stream.decode_id == "decode-0"
        await backend.close()

    asyncio.run(scenario())


def test_a_handed_off_turn_goes_to_the_decode_holding_its_conversation_unless_much_busier():
    """More new tokens than a decode computes itself: a prefill computes them, and the
    decode that holds the earlier turns takes the KV (only the new blocks move), while it is
    not busier than the other by more than the turn's held share."""

    async def scenario() -> None:
        services = ("prefill-0", "prefill"), ("decode-0", "decode"), ("decode-1", "decode")
        backend = gateway(*services, cached_prefill_tokens=64, block_size=16)
        conversation = prompt(960, 100)
        backend.router.prefixes.add("decode-1", conversation, 1000, None)
        turn = [*conversation, *prompt(100, 9000)]  # 100 new: over the 64 computed on a decode
        (placement,) = backend.router.place([turn])
        assert (placement.why, placement.decode.id) == (Why.REMOTE, "decode-1")
        holder = backend.registry.services["decode-1"]
        for running, expected in ((30, "decode-1"), (80, "decode-0")):
            # its share (960 of 1,060) outweighs 30 more requests, not 80
            holder.load = msgspec.structs.replace(holder.load, running=running)
            (placement,) = backend.router.place([turn])
            assert placement.decode.id == expected
        await backend.close()

    asyncio.run(scenario())


def test_a_prompt_goes_to_the_prefill_holding_its_prefix_while_its_queue_allows():
    async def scenario() -> None:
        services = ("prefill-0", "prefill"), ("prefill-1", "prefill"), ("decode-0", "decode")
        backend = gateway(*services, cached_prefill_tokens=0, block_size=16)
        registry = backend.registry
        ctx = zmq.Context()
        links = [ctx.socket(zmq.DEALER) for _ in range(2)]
        for sid, link in zip(("prefill-0", "prefill-1"), links, strict=True):
            link.setsockopt(zmq.IDENTITY, sid.encode())  # its end of the gateway link
            link.connect(backend.addr)
            async with asyncio.timeout(10):
                while not await backend._send(sid, P.Abort("probe")):
                    await asyncio.sleep(0.05)
        for sid in ("prefill-0", "prefill-1"):  # pools of 256 blocks of 16
            registry.heartbeat(heartbeat(sid, "prefill", blocks=256))
        system = prompt(1024, 100)  # a long shared prefix, computed on one prefill
        first = await send(backend, [*system, *prompt(40, 5000)])
        holder = first.prefill_id
        other = next(s for s in ("prefill-0", "prefill-1") if s != holder)

        def placed_on(queued: dict[str, int]) -> str:
            for sid, tokens in queued.items():
                seen = int(sid == holder)
                registry.heartbeat(heartbeat(sid, "prefill", tokens, seen, blocks=256))
            (placement,) = backend.router.place([[*system, *prompt(60, 7000)]])
            return placement.prefill.id

        # the prefix saves 1,024 tokens of the 1,084: it goes there while the holder's queue
        # is shorter than the other's by less than that
        assert placed_on({holder: 0, other: 0}) == holder
        assert placed_on({holder: 900, other: 0}) == holder
        assert placed_on({holder: 1100, other: 0}) == other
        # a prompt sharing none of it goes by queue alone
        (placement,) = backend.router.place([prompt(1084, 20000)])
        assert placement.prefill.id == other
        backend.fail_requests(registry.services[holder])  # its cache died with it
        assert placed_on({holder: 10, other: 0}) == other
        await backend.close()
        ctx.destroy(linger=0)

    asyncio.run(scenario())


def test_a_request_that_never_reaches_its_prefill_fails_over_at_once():
    """Reliability review M5: a send that failed (the service registered by its heartbeat
    socket, but its request socket is not connected) left the stream waiting until the
    request's deadline, 600 s."""

    async def scenario() -> None:
        backend = gateway(("prefill-0", "prefill"), ("decode-0", "decode"))  # no sockets
        (placement,) = backend.admit([prompt(100)]).placements
        stream = await backend.submit(placement, prompt(100), SamplingParams(max_tokens=4))
        with pytest.raises(ServiceFailed, match="prefill-0 is unreachable") as failed:
            async with asyncio.timeout(60):  # not the deadline's 600 s
                await anext(stream.tokens(deadline=time.monotonic() + 600))
        assert failed.value.retryable  # resumed elsewhere, as for a dead service
        await backend.close()

    asyncio.run(scenario())


def test_a_dead_services_metrics_series_go_with_it():
    """Reliability review L1: every restart (a new service id) left its gauges behind."""

    def series(service_id: str) -> float | None:
        labels = {"service": service_id, "role": "decode"}
        return REGISTRY.get_sample_value("baton_service_kv_blocks_total", labels)

    async def scenario() -> None:
        backend = gateway(("prefill-0", "prefill"))
        hb = heartbeat("decode-gone", "decode", blocks=32)
        backend.registry.heartbeat(hb)
        M.observe_heartbeat(hb)
        assert series("decode-gone") == 32
        backend.registry.services["decode-gone"].last_seen -= 60  # silent for a minute
        backend.reap()
        assert "decode-gone" not in backend.registry.services and series("decode-gone") is None
        await backend.close()

    asyncio.run(scenario())


def test_pools_split_the_cpus_this_process_may_use():
    """Reliability review L3: under a cpuset of CPUs 4-7, `baton up` pinned to 0-3."""
    cpuset = {4, 5, 6, 7}
    assert (default_cpus("prefill", allowed=cpuset), default_cpus("decode", allowed=cpuset)) == (
        "4,5",
        "6,7",
    )
    assert default_cpus("decode", aggregated=True, allowed=cpuset) is None  # all, unpinned
    here = sorted(os.sched_getaffinity(0))  # this process's own, by default
    assert default_cpus("decode") == (
        ",".join(map(str, here[len(here) // 2 :])) if len(here) > 1 else None
    )
