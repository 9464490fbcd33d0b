"""The pool registry and the routing policies (plain Python).

Services register by heartbeat and are dropped when silent for `timeout_s`, so pools grow
and shrink while running. Routing is decode first: the decode with the most free KV blocks
per running sequence, then the prefill with the fewest outstanding prompt tokens.
"""

import time
from dataclasses import dataclass, field

from baton import protocol as P


@dataclass
class Service:
    id: str
    role: str
    kv_addr: str
    load: P.Load
    last_seen: float
    incarnation: str = ""
    draining: bool = False
    inflight_tokens: int = 0  # prompt tokens we sent it that it has not reported yet
    local_prompts: int = 0  # decode: prompts we sent it to prefill itself, not answered yet
    requests: set[str] = field(default_factory=set)


def decode_cost(s: Service) -> float:
    """Lower is better: a decode with free blocks and a short batch takes the next request."""
    free = s.load.free_blocks / max(s.load.total_blocks, 1)
    return (len(s.requests) + s.load.running) / 64 - free


def prefill_cost(s: Service) -> float:
    return s.load.queued_tokens + s.inflight_tokens


class Registry:
    def __init__(self, timeout_s: float = 3.0):
        self.timeout_s = timeout_s
        self.services: dict[str, Service] = {}

    def heartbeat(self, hb: P.Heartbeat) -> Service | None:
        """Registers or refreshes a service; returns the previous incarnation of one that
        restarted under the same id (its requests died with it)."""
        s = self.services.get(hb.service_id)
        if s is None or s.incarnation != hb.incarnation:
            self.services[hb.service_id] = Service(
                hb.service_id, hb.role, hb.kv_addr, hb.load, time.monotonic(), hb.incarnation,
                hb.draining,
            )  # fmt: skip
            return s
        s.load, s.last_seen, s.kv_addr, s.draining = (
            hb.load,
            time.monotonic(),
            hb.kv_addr,
            hb.draining,
        )
        s.inflight_tokens = 0  # the heartbeat's queue now counts what we sent before it
        return None

    def expire(self) -> list[Service]:
        """Drop services silent for too long; return them (their requests must fail)."""
        now = time.monotonic()
        dead = [s for s in self.services.values() if now - s.last_seen > self.timeout_s]
        for s in dead:
            del self.services[s.id]
        return dead

    def pool(self, role: str) -> list[Service]:
        """The services of `role` taking new work (a draining one finishes its own)."""
        return [s for s in self.services.values() if s.role == role and not s.draining]

    def pick_decode(self, avoid: set[str] = frozenset()) -> Service | None:
        """The best decode not in `avoid` (suspects of a failure), else the best one."""
        pool = self.pool("decode")
        return min([s for s in pool if s.id not in avoid] or pool, key=decode_cost, default=None)

    def pick_prefill(self, num_tokens: int, avoid: set[str] = frozenset()) -> Service | None:
        """The least-loaded prefill not in `avoid`, with the prompt counted against it until
        its next heartbeat reports it."""
        pool = [s for s in self.pool("prefill") if s.id not in avoid]
        prefill = min(pool, key=prefill_cost, default=None)
        if prefill is not None:
            prefill.inflight_tokens += num_tokens
        return prefill
