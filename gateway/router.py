"""The pool registry and the routing policies (plain Python).

Services register by heartbeat and are dropped when silent for `timeout_s`, so pools grow
and shrink while running. Routing is decode first: the decode with the most free KV blocks
per running sequence, then the prefill with the fewest outstanding prompt tokens.
"""

import time
from collections import deque
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
    reserved_tokens: int = 0  # prompt tokens admitted for it and not sent yet
    num_sent: int = 0  # prompts sent to it, ever (its Load.requests_seen counts them there)
    # (number, prompt tokens) of prompts sent that its last heartbeat did not count yet
    unreported: deque[tuple[int, int]] = field(default_factory=deque)
    local_tokens: int = 0  # decode: tokens of prompts it prefills itself, not answered yet
    requests: set[str] = field(default_factory=set)

    @property
    def inflight_tokens(self) -> int:
        """Prompt tokens its load does not show yet: a heartbeat carries a snapshot taken
        up to a period earlier, so what was sent since is counted here until one counts it."""
        return self.reserved_tokens + sum(n for _, n in self.unreported)

    def sent_prompt(self, num_tokens: int) -> None:
        self.reserved_tokens = max(0, self.reserved_tokens - num_tokens)
        self.num_sent += 1
        self.unreported.append((self.num_sent, num_tokens))

    def reported(self, load: P.Load) -> None:
        self.load = load
        while self.unreported and self.unreported[0][0] <= load.requests_seen:
            self.unreported.popleft()
        self.reserved_tokens = 0  # admission and send are one step of one request


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
        s.last_seen, s.kv_addr, s.draining = time.monotonic(), hb.kv_addr, hb.draining
        s.reported(hb.load)
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
            prefill.reserved_tokens += num_tokens
        return prefill
