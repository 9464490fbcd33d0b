"""The pool registry and the routing policy (plain Python).

Services register by heartbeat and are dropped when silent for `timeout_s`, so pools grow
and shrink while running. Routing is one decision per prompt, decode first: the decode with
the most free KV blocks per running sequence, less the share of the prompt it holds (the
hand-off does not move what it holds), or the one that holds all but a few tokens of it, then
whether that decode prefills it itself, else the prefill with the fewest prompt tokens to
compute before this one's first token: its queue, and the part of this prompt its prefix cache
does not hold (the gateway's record of what each computed lately: a shared system prompt, an
agent's earlier turns).
"""

import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from baton import protocol as P
from baton.gateway.prefix_index import PrefixIndex
from baton.slo import STEP_AIM, prefill_seconds, tokens_until_done


class NoCapacity(RuntimeError):
    pass


@dataclass
class Service:
    id: str
    role: str
    kv_addr: str
    load: P.Load
    last_seen: float
    incarnation: str = ""
    draining: bool = False
    reserved_tokens: int = 0  # prefill: prompt tokens admitted for it and not sent yet
    reserved_requests: int = 0  # decode: requests admitted for it and not sent yet
    num_sent: int = 0  # prompts sent to it, ever (its Load.requests_seen counts them there)
    # (number, prompt tokens) of prompts sent that its last heartbeat did not count yet
    unreported: deque[tuple[int, int]] = field(default_factory=deque)
    local_tokens: int = 0  # decode: tokens of prompts it prefills itself, not answered yet
    kept: int = 0  # prefill: requests it decodes itself (Why.KEPT), not finished yet
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
        # admission and send are one step of one request: what is left was never sent
        self.reserved_tokens = self.reserved_requests = 0


def decode_cost(s: Service, placed: int = 0) -> float:
    """Lower is better: a decode with free blocks and a short batch takes the next request.
    `placed`: requests just placed on it, not reserved yet."""
    free = s.load.free_blocks / max(s.load.total_blocks, 1)
    return (len(s.requests) + s.reserved_requests + placed + s.load.running) / 64 - free


def prefill_cost(s: Service, placed: int = 0) -> float:
    """The prompt tokens queued at a prefill, `placed` (just placed there) included."""
    return s.load.queued_tokens + s.inflight_tokens + placed


def decode_full(decode: Service, placed: int, tpot_s: float) -> bool:
    """Whether one more sequence would take a decode's step past STEP_AIM of the TPOT target
    (its fitted step times; never before they are measured)."""
    fixed, per_seq = decode.load.step_fixed_s, decode.load.step_per_unit_s
    batch = max(decode.load.running, len(decode.requests)) + decode.reserved_requests + placed
    return fixed + per_seq > 0 and fixed + per_seq * (batch + 1) > STEP_AIM * tpot_s


def remote_wait_s(prefill: Service, tokens: float) -> float | None:
    """Seconds a prefill takes to compute `tokens` prompt tokens, from its fitted step
    times; None before they are measured."""
    fit = (prefill.load.step_fixed_s, prefill.load.step_per_unit_s)
    if sum(fit) <= 0:
        return None
    return prefill_seconds(int(tokens), fit, prefill.load.step_budget or int(tokens) or 1)


def prompt_rate(decode: Service, prefill: Service | None) -> float:
    """Prompt tokens a second a decode's core computes beside its batch (Load.prompt_rate).
    Before it has computed any, half a prefill core's speed is the guess (the other half
    decodes); 0 with neither measured."""
    if decode.load.prompt_rate <= 0 and prefill is not None and prefill.load.step_per_unit_s > 0:
        return 0.5 / prefill.load.step_per_unit_s
    return decode.load.prompt_rate


def local_wait_s(decode: Service, placed: int, n: int, rate: float) -> float | None:
    """Seconds until a decode's core, computing `rate` prompt tokens a second, has computed a
    new prompt of `n` tokens, after its own prompts queued there and `placed` tokens just placed
    there: its scheduler interleaves the newcomer's chunks with the queue's (tokens_until_done).
    None when the rate is not known."""
    if rate <= 0:
        return None
    load = decode.load
    ahead = load.ahead_tokens + decode.inflight_tokens + placed
    queued = decode.local_tokens + placed
    budget = load.prompt_budget or queued + n
    return tokens_until_done(queued, n, budget, ahead, load.chunk_tokens) / rate


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
                hb.draining, num_sent=hb.load.requests_seen,  # it counts from its own start
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

    def live(self, service: Service) -> bool:
        """Whether `service` is registered (not a dead or restarted one's record) and takes
        new work."""
        return self.services.get(service.id) is service and not service.draining


class Why(Enum):
    """Why a prompt prefills where it does; but for REMOTE, the `why` label of
    baton_local_prefills_routed_total."""

    CACHED = "cached"  # its decode holds its prefix (it served the turns before)
    SHORT = "short"  # cheaper on its decode than handed off, or no prefill is left to take it
    STOLEN = "stolen"  # it would queue behind every prefill: its decode's core takes it
    KEPT = "kept"  # every decode is full: a prefill with room decodes it too (decode = it)
    REMOTE = "remote"  # a prefill computes it and hands its KV to the decode


@dataclass(frozen=True)
class Placement:
    """Where one prompt of `num_tokens` goes: its decode, and the prefill that hands it its
    KV, or None where the decode prefills it itself."""

    decode: Service
    prefill: Service | None
    why: Why
    num_tokens: int
    # prefilled on its decode (SHORT, STOLEN): predicted seconds until its prompt is computed,
    # and of those its own prompt's, were the core computing nothing else
    wait_s: float | None = None
    own_s: float | None = None

    @property
    def prefiller(self) -> Service:
        """The service its prompt is sent to, which computes it."""
        return self.prefill or self.decode


class Router:
    """Conditional disaggregation. A turn whose prefix a decode still holds goes there when at
    most `cached_prefill_tokens` of it are new: that computes only the new tokens and moves no
    KV. A prompt up to `local_prefill_tokens` costs less to prefill on its decode than to hand
    off; with no prefill left (aggregated, or all gone) every prompt does, rather than fail.
    And work stealing, so the cores follow the load: a prompt up to `busy_prefill_tokens`
    prefills on its decode when that core, computing prompts only in the TPOT slack beside its
    batch, would finish it (after its own queue of them) before the least loaded prefill
    would. The other way round, when even the least loaded decode is full (one more sequence
    would take its step past the TPOT target), a prefill with at most a step of prompts queued
    and fewer requests of its own than that decode keeps the request: it decodes it beside its
    prompts, which it then paces to the TPOT target too."""

    def __init__(
        self,
        local_prefill_tokens: int = 0,
        busy_prefill_tokens: int = 0,
        cached_prefill_tokens: int = 0,
        block_size: int = 16,
        service_timeout_s: float = 3.0,
        tpot_s: float = 0.1,
    ):
        self.registry = Registry(service_timeout_s)
        self.block_size = block_size
        # what each decode served (cached_prefill) and each prefill computed
        self.prefixes = PrefixIndex(block_size)
        self.local_prefill_tokens = local_prefill_tokens
        self.busy_prefill_tokens = busy_prefill_tokens
        self.cached_prefill_tokens = cached_prefill_tokens
        self.tpot_s = tpot_s

    def place(
        self, prompts: list[list[int]], avoid: set[str] = frozenset(), salt: bytes | None = None
    ) -> list[Placement]:
        """Each prompt's placement, away from the services in `avoid` (suspects of a failure)
        where others are live; raises NoCapacity with no decode. Changes nothing: the prompts
        placed before count against the services for the next, and `reserve` counts them for
        good once admitted. `salt`: whose cached prefixes they may use (cache_salt)."""
        placements: list[Placement] = []
        for ids in prompts:
            placements.append(self._place_one(ids, avoid, placements, salt))
        return placements

    def _place_one(
        self, ids: list[int], avoid: set[str], before: list[Placement], salt: bytes | None
    ) -> Placement:
        def decode_load(s: Service) -> float:
            return decode_cost(s, sum(p.decode is s for p in before))

        def prefill_load(s: Service) -> float:
            return prefill_cost(s, sum(p.num_tokens for p in before if p.prefill is s))

        n = len(ids)
        hits = self.prefixes.cached_tokens(ids, salt)  # per service, of what it served or computed
        decodes = self.registry.pool("decode")
        spared = [s for s in decodes if s.id not in avoid]
        if self.cached_prefill_tokens and spared:
            if held := [s for s in spared if s.id in hits]:
                # the most of it held; among equals (a shared system prompt) the least loaded
                best = max(held, key=lambda s: (hits[s.id], -decode_load(s)))
                if n - hits[best.id] <= self.cached_prefill_tokens:
                    return Placement(best, None, Why.CACHED, n)
        # the least loaded decode, less the share of the prompt it holds (its KV need not move:
        # an agent's next turn goes back to the decode that served the last, unless it is busier
        # by more than that turn is worth)
        decode = min(
            spared or decodes, key=lambda s: decode_load(s) - hits.get(s.id, 0) / n, default=None
        )
        if decode is None:
            raise NoCapacity("no decode service is available")
        prefills = [s for s in self.registry.pool("prefill") if s.id not in avoid]
        # the prefill with the least to compute before this prompt's first token: its queue,
        # and the part of the prompt its prefix cache does not hold (it computed it lately)
        prefill = min(prefills, key=lambda s: prefill_load(s) - hits.get(s.id, 0), default=None)
        # the prompts just placed on its core (this request's before this one)
        local = sum(p.num_tokens for p in before if p.decode is decode and not p.prefill)
        rate = prompt_rate(decode, prefill)
        local_s = local_wait_s(decode, local, n, rate)
        own_s = n / rate if rate > 0 else None
        if n <= self.local_prefill_tokens or prefill is None:
            return Placement(decode, None, Why.SHORT, n, local_s, own_s)
        placed = sum(p.decode is decode for p in before)
        if decode_full(decode, placed, self.tpot_s):
            keepers = [
                s for s in prefills
                if prefill_load(s) + n <= (s.load.step_budget or n)
                and s.kept + sum(p.decode is s for p in before) < len(decode.requests) + placed
            ]  # fmt: skip
            if keepers:
                return Placement(min(keepers, key=lambda s: s.kept), None, Why.KEPT, n)
        if n <= self.busy_prefill_tokens:
            remote_s = remote_wait_s(prefill, prefill_load(prefill) + n - hits.get(prefill.id, 0))
            if local_s is not None and remote_s is not None and local_s < remote_s:
                return Placement(decode, None, Why.STOLEN, n, local_s, own_s)
        return Placement(decode, prefill, Why.REMOTE, n)

    def reserve(self, placements: list[Placement]) -> None:
        """Count admitted placements on their services at once, so the next placement sees
        them before they are sent (Service.sent_prompt and Backend.submit uncount them)."""
        for p in placements:
            p.decode.reserved_requests += 1
            if p.prefill is not None:
                p.prefill.reserved_tokens += p.num_tokens
