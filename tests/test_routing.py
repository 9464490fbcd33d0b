"""The gateway's routing decisions, on a registry fed by heartbeats (no model, no services)."""

import asyncio

from baton import protocol as P
from baton.config import GatewayConfig, SLOConfig
from baton.sampling_params import SamplingParams
from gateway.admission import Admission
from gateway.backend import Backend
from gateway.router import prefill_cost


def heartbeat(
    service_id: str, role: str, queued_tokens: int = 0, requests_seen: int = 0
) -> P.Heartbeat:
    load = P.Load(queued_tokens, 0, 64, 64, requests_seen=requests_seen)
    return P.Heartbeat(service_id, role, "tcp://127.0.0.1:1" if role == "decode" else "", load)


def test_a_busy_prefill_lends_short_prompts_to_a_decode_prefilling_nothing():
    async def scenario() -> None:
        admission = Admission(GatewayConfig(), SLOConfig())
        backend = Backend("tcp://127.0.0.1:0", admission, busy_prefill_tokens=64)
        registry = backend.registry
        registry.heartbeat(heartbeat("prefill-0", "prefill"))
        registry.heartbeat(heartbeat("decode-0", "decode"))
        assert not backend.prefills_locally(10)  # an idle prefill takes it, as always
        registry.heartbeat(heartbeat("prefill-0", "prefill", queued_tokens=500))
        assert backend.prefills_locally(10)  # it would queue: the decode's core takes it
        assert not backend.prefills_locally(65)  # longer than the decode may take
        # one at a time per decode, until its first token comes back (or it ends)
        stream = await backend.submit(list(range(10)), SamplingParams(max_tokens=4))
        decode = registry.services["decode-0"]
        assert stream.prefill_id == stream.decode_id == "decode-0"
        assert decode.local_prompts == 1
        assert not backend.prefills_locally(10)
        await backend.finish(stream)
        assert decode.local_prompts == 0
        assert backend.prefills_locally(10)
        await backend.close()

    asyncio.run(scenario())


def test_with_work_stealing_off_a_busy_prefill_still_takes_every_prompt():
    async def scenario() -> None:
        backend = Backend("tcp://127.0.0.1:0", Admission(GatewayConfig(), SLOConfig()))
        backend.registry.heartbeat(heartbeat("prefill-0", "prefill", queued_tokens=500))
        backend.registry.heartbeat(heartbeat("decode-0", "decode"))
        assert not backend.prefills_locally(1)
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
        for n in (100, 200):
            await backend.submit(list(range(n)), SamplingParams(max_tokens=4))
        assert prefill_cost(prefill) == 300
        # taken after the first prompt arrived, before the second: that one still counts
        registry.heartbeat(heartbeat("prefill-0", "prefill", queued_tokens=100, requests_seen=1))
        assert prefill_cost(prefill) == 100 + 200
        registry.heartbeat(heartbeat("prefill-0", "prefill", queued_tokens=0, requests_seen=2))
        assert prefill_cost(prefill) == 0
        await backend.close()

    asyncio.run(scenario())
