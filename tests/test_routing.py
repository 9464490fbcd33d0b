"""The gateway's routing decisions, on a registry fed by heartbeats (no model, no services)."""

import asyncio

import msgspec
import zmq

from baton import protocol as P
from baton.config import GatewayConfig, SLOConfig
from baton.gateway.admission import Admission
from baton.gateway.backend import LOCAL, Backend
from baton.gateway.router import prefill_cost
from baton.sampling_params import SamplingParams
from baton.slo import STEAL_SHARE


def heartbeat(
    service_id: str, role: str, queued_tokens: int = 0, requests_seen: int = 0
) -> P.Heartbeat:
    load = P.Load(queued_tokens, 0, 64, 64, requests_seen=requests_seen)
    return P.Heartbeat(service_id, role, "tcp://127.0.0.1:1" if role == "decode" else "", load)


def local(backend: Backend, num_tokens: int) -> str:
    """Why a prompt of `num_tokens` would prefill on a decode ("": it is handed off)."""
    return backend.local_decode(list(range(num_tokens)))[1]


def test_a_busy_prefill_lends_short_prompts_to_a_decode_while_its_own_queue_is_shorter():
    async def scenario() -> None:
        admission = Admission(GatewayConfig(), SLOConfig())
        backend = Backend("tcp://127.0.0.1:0", admission, busy_prefill_tokens=64)
        registry = backend.registry
        registry.heartbeat(heartbeat("prefill-0", "prefill"))
        registry.heartbeat(heartbeat("decode-0", "decode"))
        assert local(backend, 10) == ""  # an idle prefill takes it, as always
        # the decode's own prompts to prefill may come to STEAL_SHARE of the prefill's queue
        registry.heartbeat(heartbeat("prefill-0", "prefill", queued_tokens=200))
        share = int(STEAL_SHARE * 200)
        assert local(backend, 20) == "stolen"  # it would queue: the decode's core takes it
        assert local(backend, 65) == ""  # longer than the decode may take
        # its prompts count until their first tokens come back (or they end)
        stream = await backend.submit(list(range(40)), SamplingParams(max_tokens=4))
        decode = registry.services["decode-0"]
        assert stream.prefill_id == stream.decode_id == "decode-0"
        assert decode.local_tokens == 40
        assert local(backend, share - 40) == "stolen"
        assert local(backend, share - 39) == ""
        await backend.finish(stream)
        assert decode.local_tokens == 0
        assert local(backend, share) == "stolen"
        await backend.close()

    asyncio.run(scenario())


def test_stolen_prompts_of_one_request_share_one_allowance_and_a_restart_drops_them():
    async def scenario() -> None:
        admission = Admission(GatewayConfig(), SLOConfig())
        backend = Backend("tcp://127.0.0.1:0", admission, busy_prefill_tokens=64)
        registry = backend.registry
        registry.heartbeat(heartbeat("prefill-0", "prefill", queued_tokens=200))
        registry.heartbeat(heartbeat("decode-0", "decode"))
        share = int(STEAL_SHARE * 200)
        # a request of two prompts, each within the share, both together not
        half = list(range(share // 2 + 1))
        assert backend.admit([half, half]).prefills == [LOCAL, "prefill-0"]
        stream = await backend.submit(half, SamplingParams(max_tokens=4))
        assert registry.services["decode-0"].local_tokens == len(half)
        # the decode restarts: its stolen prompt died with it, and the successor starts at 0
        restarted = P.Heartbeat("decode-0", "decode", "tcp://127.0.0.1:1", P.Load(0, 0, 64, 64))
        restarted = msgspec.structs.replace(restarted, incarnation="again")
        backend.fail_requests(registry.heartbeat(restarted))
        await backend.finish(stream)
        assert registry.services["decode-0"].local_tokens == 0
        await backend.close()

    asyncio.run(scenario())


def test_with_work_stealing_off_a_busy_prefill_still_takes_every_prompt():
    async def scenario() -> None:
        backend = Backend("tcp://127.0.0.1:0", Admission(GatewayConfig(), SLOConfig()))
        backend.registry.heartbeat(heartbeat("prefill-0", "prefill", queued_tokens=500))
        backend.registry.heartbeat(heartbeat("decode-0", "decode"))
        assert local(backend, 1) == ""
        await backend.close()

    asyncio.run(scenario())


def test_prompts_sent_after_a_heartbeats_snapshot_count_until_a_heartbeat_counts_them():
    """A heartbeat carries a load snapshot taken up to a period before it arrives: the
    prompts sent since must still weigh on admission and routing."""

    async def scenario() -> None:
        backend = Backend("tcp://127.0.0.1:0", Admission(GatewayConfig(), SLOConfig()))
        registry = backend.registry
        registry.heartbeat(heartbeat("prefill-0", "prefill"))
        registry.heartbeat(heartbeat("decode-0", "decode"))
        prefill = registry.services["prefill-0"]
        # nobody is there to take it (the send fails): not counted as sent, so it cannot
        # shift the count the prefill's heartbeats are matched against
        await backend.submit(list(range(50)), SamplingParams(max_tokens=4))
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
            await backend.submit(list(range(n)), SamplingParams(max_tokens=4))
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
        admission = Admission(GatewayConfig(), SLOConfig())
        backend = Backend("tcp://127.0.0.1:0", admission, cached_prefill_tokens=32, block_size=16)
        registry = backend.registry
        for sid, role in (("prefill-0", "prefill"), ("decode-0", "decode"), ("decode-1", "decode")):
            registry.heartbeat(heartbeat(sid, role))
        turn1 = list(range(100, 300))  # 200 tokens: handed off
        stream = await backend.submit(turn1, SamplingParams(max_tokens=8))
        assert stream.prefill_id == "prefill-0"
        answer = list(range(900, 908))
        await backend.finish(stream, turn1 + answer)  # its decode now caches turn1 + answer
        turn2 = turn1 + answer + list(range(5000, 5020))  # 20 new tokens after 208 held
        decode, why = backend.local_decode(turn2)
        assert (decode.id, why) == (stream.decode_id, "cached")
        stream2 = await backend.submit(turn2, SamplingParams(max_tokens=8))
        assert stream2.prefill_id == stream2.decode_id == stream.decode_id
        # too much new, a prefix nobody holds, or its decode avoided: handed off as usual
        assert backend.local_decode(turn1 + list(range(5000, 5100)))[1] == ""
        assert backend.local_decode(list(range(7000, 7200)))[1] == ""
        assert backend.local_decode(turn2, avoid={stream.decode_id})[1] == ""
        # a decode that died took its cache with it
        backend.fail_requests(registry.services[stream.decode_id])
        assert backend.local_decode(turn2)[1] == ""
        await backend.close()

    asyncio.run(scenario())
