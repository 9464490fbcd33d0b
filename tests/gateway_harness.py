"""What the routing tests share: a gateway backend fed by heartbeats the test writes (no model,
no services)."""

from baton import protocol as P
from baton.config import GatewayConfig, SLOConfig
from baton.gateway.admission import Admission
from baton.gateway.backend import Backend, Stream
from baton.gateway.router import Router, Why
from baton.sampling_params import SamplingParams


def heartbeat(
    service_id: str,
    role: str,
    queued_tokens: int = 0,
    requests_seen: int = 0,
    blocks: int = 64,
    **load,
) -> P.Heartbeat:
    """`blocks`: its pool, all free; `load`: more Load fields (step times, prompt_rate)."""
    load = P.Load(queued_tokens, 0, blocks, blocks, requests_seen=requests_seen, **load)
    return P.Heartbeat(service_id, role, "tcp://127.0.0.1:1" if role == "decode" else "", load)


def gateway(*services: tuple[str, str], max_queued: int = 256, **router: int) -> Backend:
    """The gateway's backend with these (id, role) services registered, routing with the
    `router` settings."""
    admission = Admission(GatewayConfig(max_queued_requests=max_queued), SLOConfig())
    backend = Backend("tcp://127.0.0.1:0", admission, Router(**router), aggregated=False)
    for sid, role in services:
        backend.registry.heartbeat(heartbeat(sid, role))
    return backend


def prompt(num_tokens: int, first: int = 0) -> list[int]:
    return list(range(first, first + num_tokens))


def why(backend: Backend, ids: list[int], avoid: set[str] = frozenset()) -> Why:
    """Why a prompt would prefill where it would."""
    return backend.router.place([ids], avoid)[0].why


async def send(backend: Backend, ids: list[int]) -> Stream:
    """Admit a one-prompt request and send it as placed."""
    (placement,) = backend.admit([ids]).placements
    return await backend.submit(placement, ids, SamplingParams(max_tokens=4))


# a prefill that computes 1,000 prompt tokens a second in steps of up to 512 (10 ms each
# besides): 100 tokens behind an empty queue take 0.11 s
PREFILL_STEPS = {"step_fixed_s": 0.01, "step_per_unit_s": 0.001, "step_budget": 512}


def busy_prefill(queued_tokens: int) -> P.Heartbeat:
    return heartbeat("prefill-0", "prefill", queued_tokens, **PREFILL_STEPS)
