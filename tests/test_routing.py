"""The gateway's routing decisions, on a registry fed by heartbeats (no model, no services)."""

import asyncio

from baton import protocol as P
from baton.config import GatewayConfig, SLOConfig
from baton.sampling_params import SamplingParams
from gateway.admission import Admission
from gateway.backend import Backend


def heartbeat(service_id: str, role: str, queued_tokens: int = 0) -> P.Heartbeat:
    load = P.Load(queued_tokens=queued_tokens, running=0, free_blocks=64, total_blocks=64)
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
