"""How many prefill and decode services the load wants now, exported as
`baton_desired_replicas{pool}` for a cluster's autoscaler (an HPA on that external metric, or
KEDA; `baton k8s render` writes both). Plain state, fed by the gateway, decided each reap.

- prefill: the prompt tokens asked for over the last `window_s` (refused ones too: a 429 is
  demand unmet) at the prefills' fitted cost per token, over `headroom` of a service's time.
  With no prefill pool (aggregated) the decodes' prompt work stays there, unless the p90
  prompt (of enough requests to tell) would miss TTFT in the slack a decode leaves beside its
  batch (`first_prefills`); once there, the pool keeps one at least.
- decode: the sequences running, over what one decode runs within the TPOT target (its
  fitted step time, as the router's decode_full), and the KV blocks in use, each over
  `headroom` of a decode's capacity.
- the SLO itself: a TTFT (TPOT) p90 over its target with enough requests to tell asks for
  one prefill (decode) more than there is, whatever the fits say.
- hysteresis: up at once; down one service at a time, once the lower count has held for
  `down_after_s`.

With a fixed number of cores (`[autoscale] max_services` shares of them: `baton up --autoscale`
acts on it) the question is their split instead (`split`), in cores: none for prefill (one
engine on every core) while the slack beside its batch computes the prompts asked for in time
for TTFT, or where a prefill pool's own cores would compute them no faster than that slack;
otherwise the prefill pool's share follows its share of the work, one at least on each side. A
new split is taken once it has been wanted for `down_after_s`.
"""

import math
import time
from collections import deque
from collections.abc import Callable, Iterable

from baton.config import AutoscaleConfig, SLOConfig
from baton.gateway.router import Registry, Service
from baton.slo import STEP_AIM

MAX_SAMPLES = 10_000  # per window: a burst beyond it keeps the latest
MIN_REQUESTS = 10  # before a p90 says anything
MIN_SPAN_S = 5.0  # the shortest time a rate of asked tokens is taken over: one request is no rate


class Autoscaler:
    def __init__(
        self,
        slo: SLOConfig,
        config: AutoscaleConfig | None = None,
        headroom: float = 0.7,
        max_replicas: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ):
        config = config or AutoscaleConfig()
        self.ttft_s, self.tpot_s = slo.ttft_ms / 1000, slo.tpot_ms / 1000
        self.window_s, self.down_after_s = config.window_s, config.down_after_s
        self.total, self.share_cores = config.max_services, config.share_cores  # (in shares)
        self.headroom, self.max_replicas, self.clock = headroom, max_replicas, clock
        self.token_s = 0.0  # the last measured cost of a prompt token, in a core's seconds
        self.asked: deque[tuple[float, int]] = deque(maxlen=MAX_SAMPLES)  # (when, tokens)
        self.ttfts: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)
        self.tpots: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)
        self.desired: dict[str, int] = {}
        self.lower_since: dict[str, float] = {}  # pool -> when a lower count was first wanted
        self.split_since: float | None = None  # when another split was first wanted

    def demand(self, prompt_tokens: int) -> None:
        """A request asked for (admitted or refused)."""
        self.asked.append((self.clock(), prompt_tokens))

    def served(self, ttft_s: float, tpot_s: float | None) -> None:
        now = self.clock()
        self.ttfts.append((now, ttft_s))
        if tpot_s is not None:
            self.tpots.append((now, tpot_s))

    def trim(self, now: float) -> None:
        for samples in (self.asked, self.ttfts, self.tpots):
            while samples and now - samples[0][0] > self.window_s:
                samples.popleft()

    def offered_load(self, registry: Registry) -> float:
        """The prompt work asked for over what the services computing prompts do in the time:
        tokens asked in the window (since the first of them, when later, but over at least
        MIN_SPAN_S) per second, over the tokens a second the prefills' fits and the decodes'
        measured prompt rates give. Below 1 the stack keeps up; 0 before anything is measured."""
        now = self.clock()
        self.trim(now)
        rate = sum(1 / c for s in registry.pool("prefill") if (c := per_token_s(s)) > 0)
        rate += sum(s.load.prompt_rate for s in registry.pool("decode"))
        if rate <= 0 or not self.asked:
            return 0.0
        span = max(now - self.asked[0][0], MIN_SPAN_S)
        return sum(n for _, n in self.asked) / span / rate

    def decide(self, registry: Registry) -> dict[str, int]:
        """The count each pool wants now (hysteresis applied)."""
        now = self.clock()
        self.trim(now)
        prefills, decodes = registry.pool("prefill"), registry.pool("decode")
        if self.total:
            prefill_cores = sum(map(cores_of, prefills))
            cores = prefill_cores + sum(map(cores_of, decodes))
            if not self.desired and cores < self.total * self.share_cores:
                return {}  # still starting: no split to keep yet
            present = round(prefill_cores / self.share_cores)
            return self.settle_split(self.split(prefills, decodes, present), present, now)
        present = {"prefill": len(prefills), "decode": len(decodes)}
        wanted = {
            "prefill": self.prefills_wanted(prefills, decodes),
            "decode": self.decodes_wanted(decodes, aggregated=not prefills),
        }
        for pool, count in wanted.items():
            wanted_now = min(count, self.max_replicas)
            self.desired[pool] = self.settle(pool, wanted_now, present[pool], now)
        return dict(self.desired)

    def work(self, prefills: list[Service], decodes: list[Service]) -> tuple[float, float, float]:
        """The work asked now, in cores' worth: prompt tokens at a token's measured cost on one
        core; running sequences (the decodes' and the prompts in progress on prefills, which
        aggregated would be the decodes') over what the decodes run within TPOT (and their
        batch caps), times their cores; and the p90 prompt, in a core's seconds."""
        costs = [c * cores_of(s) for s in prefills if (c := per_token_s(s)) > 0]
        costs = costs or [
            s.load.prompt_token_s * cores_of(s) for s in decodes if s.load.prompt_token_s > 0
        ]
        if costs:
            self.token_s = sum(costs) / len(costs)
        prompt_work = sum(n for _, n in self.asked) / self.window_s * self.token_s
        measured = [(s, cap) for s in decodes if (cap := batch_within_tpot(s, self.tpot_s))]
        capacity = sum(min(cap, s.load.step_budget or cap) for s, cap in measured)
        sequences = sum(s.load.running for s in decodes + prefills)
        decode_work = (
            sequences / capacity * sum(cores_of(s) for s, _ in measured) if capacity else 0.0
        )
        longest = p90_of(n for _, n in self.asked) * self.token_s
        return prompt_work, decode_work, longest

    def split(self, prefills: list[Service], decodes: list[Service], present: int) -> int | None:
        """The shares (of `total`) the prefill pool should have for the work asked now
        (`work`). `present`: the prefill's shares now. None before anything is measured or
        asked."""
        prompt_work, decode_work, longest = self.work(prefills, decodes)
        if prompt_work + decode_work <= 0:
            return None
        # aggregated, one engine on every core computes prompts in the slack beside its batch;
        # split, the prefill's cores compute nothing else: worth it where they are more
        slack = self.headroom * max(self.total * self.share_cores - decode_work, 0.0)
        misses = prompt_work > slack or longest > self.ttft_s * slack
        share = round(self.total * prompt_work / (prompt_work + decode_work))
        wanted = min(max(1, share), self.total - 1)
        helps = wanted * self.share_cores > slack
        wanted = wanted if prompt_work > 0 and misses and helps else 0
        # the SLO missed on one side only: a core more on that side, whatever the fits say
        # (toward prefill only where its cores would outdo the slack)
        late, slow = p90(self.ttfts) > self.ttft_s, p90(self.tpots) > self.tpot_s
        current = self.desired.get("prefill", present)  # a move may be under way
        if late and not slow and (current + 1) * self.share_cores > slack:
            wanted = max(wanted, current + 1)
        elif slow and not late:
            wanted = min(wanted, current - 1)
        return min(max(wanted, 0), self.total - 1)

    def settle_split(self, prefills: int | None, present: int, now: float) -> dict:
        """From the last split (the prefill's `present` shares at the first), to `prefills`
        once it has been wanted for down_after_s."""
        current = self.desired.get("prefill", present)
        if prefills is None or prefills == current:
            self.split_since = None
        else:
            self.split_since = now if self.split_since is None else self.split_since
            if now - self.split_since >= self.down_after_s:
                self.split_since = None
                current = prefills
                self.ttfts.clear()  # they tell of the split before
                self.tpots.clear()
        self.desired = {"prefill": current, "decode": self.total - current}
        return dict(self.desired)

    def prefills_wanted(self, prefills: list[Service], decodes: list[Service]) -> int:
        if not prefills:
            return self.first_prefills(decodes)
        costs = [c for s in prefills if (c := per_token_s(s)) > 0]
        busy = 0.0  # prefill-seconds asked per second
        if costs:
            busy = sum(n for _, n in self.asked) / self.window_s * (sum(costs) / len(costs))
        need = math.ceil(busy / self.headroom)
        if p90(self.ttfts) > self.ttft_s:
            need = max(need, len(prefills) + 1)
        return max(1, need)

    def first_prefills(self, decodes: list[Service]) -> int:
        """Aggregated (no prefill pool), the decodes prefill and scale out for prompt
        throughput (decodes_wanted); prefills are wanted only where the p90 prompt would miss
        TTFT in the slack one decode leaves beside its batch (a prefill, as many cores and
        nothing else to run, computes it faster): then enough of them for the prompt work."""
        if not decodes or len(self.asked) < MIN_REQUESTS:  # one long prompt is no p90
            return 0
        prompt_work, decode_work, longest = self.work([], decodes)
        pod = sum(map(cores_of, decodes)) / len(decodes)
        slack = self.headroom * max(pod - decode_work / len(decodes), 0.0)
        if prompt_work <= 0 or longest <= self.ttft_s * slack:
            return 0
        return math.ceil(prompt_work / (self.headroom * pod))

    def decodes_wanted(self, decodes: list[Service], aggregated: bool) -> int:
        running = sum(max(s.load.running, len(s.requests)) for s in decodes)
        per_decode = [cap for s in decodes if (cap := batch_within_tpot(s, self.tpot_s))]
        need = 0
        if per_decode:
            need = math.ceil(running / (sum(per_decode) / len(per_decode)) / self.headroom)
        used = sum(s.load.total_blocks - s.load.free_blocks for s in decodes)
        if blocks := sum(s.load.total_blocks for s in decodes):
            need = max(need, math.ceil(used / (blocks / len(decodes)) / self.headroom))
        if aggregated:  # their cores compute every prompt too, beside their batches
            rates = [s.load.prompt_rate for s in decodes if s.load.prompt_rate > 0]
            if rates:
                asked = sum(n for _, n in self.asked) / self.window_s
                need = max(need, math.ceil(asked / (sum(rates) / len(rates)) / self.headroom))
        slow = p90(self.tpots) > self.tpot_s or (aggregated and p90(self.ttfts) > self.ttft_s)
        if slow:
            need = max(need, len(decodes) + 1)
        return max(1, need)

    def settle(self, pool: str, wanted: int, present: int, now: float) -> int:
        """From the last decision (the pool's size at the first), toward `wanted`."""
        current = self.desired.get(pool, present)
        if wanted >= current:
            self.lower_since.pop(pool, None)
            return wanted
        since = self.lower_since.setdefault(pool, now)
        if now - since < self.down_after_s:
            return current
        self.lower_since[pool] = now  # the next step down waits as long again
        return current - 1


def cores_of(service: Service) -> int:
    return max(service.load.threads, 1)


def per_token_s(prefill: Service) -> float:
    """A prefill's fitted seconds per prompt token, its per-step cost spread over a full step."""
    load = prefill.load
    if load.step_per_unit_s <= 0 and load.step_fixed_s <= 0:
        return 0.0
    return load.step_per_unit_s + load.step_fixed_s / max(load.step_budget, 1)


def batch_within_tpot(decode: Service, tpot_s: float) -> float | None:
    """Sequences a decode's step takes within STEP_AIM of the TPOT target (its fit); None
    before it is measured."""
    fixed, per_seq = decode.load.step_fixed_s, decode.load.step_per_unit_s
    if per_seq <= 0:
        return None
    return max(1.0, (STEP_AIM * tpot_s - fixed) / per_seq)


def p90(samples: deque[tuple[float, float]]) -> float:
    """The 90th percentile of the window's values; 0 with too few to tell."""
    return p90_of(v for _, v in samples) if len(samples) >= MIN_REQUESTS else 0.0


def p90_of(values: Iterable[float]) -> float:
    ordered = sorted(values)
    return ordered[int(0.9 * (len(ordered) - 1))] if ordered else 0.0
