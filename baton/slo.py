"""What the SLO targets turn into, as plain Python: measured step-time models, a TTFT
prediction for admission, and a decode batch cap for TPOT.

Services measure every engine step and report the fitted figures in their heartbeats; the
gateway and the decode scheduler act on them. Nothing here knows about sockets or torch.
"""

import math
from collections import deque
from dataclasses import dataclass

# A decode aims its sequences' mean time per token at this share of the TPOT target: a
# request's TPOT averages its steps, and the fits' predictions run short at times.
STEP_AIM = 0.8
# The least share of a decode core's time prompts beside its batch get: they always advance.
MIN_PROMPT_SHARE = 0.1
FIRST_CHUNK = 16  # prompt tokens beside a batch before their cost there is known


class StepTimes:
    """Step seconds as a line in a step's size, fitted over the last `window` steps:

        seconds ~= fixed + per_unit * units

    where units are prompt tokens (prefill: the slope is 1 / throughput) or sequences in the
    batch (decode: the slope is what one more sequence adds to every token's latency)."""

    def __init__(self, window: int = 256):
        self.samples: deque[tuple[float, float]] = deque(maxlen=window)

    def observe(self, units: float, seconds: float) -> None:
        if units > 0:
            self.samples.append((units, seconds))

    def fit(self, extrapolate: bool = True) -> tuple[float, float] | None:
        """(fixed, per_unit), or None before two steps were seen. With one size only, or
        sizes whose times do not grow with them (noise hides the slope), all of the time is
        taken as per-unit cost (a cautious guess at larger sizes), unless `extrapolate` is
        off: then None. A flat line (all fixed cost) would say a prompt of any length costs
        one step, and admission would refuse nothing."""
        n = len(self.samples)
        if n < 2:
            return None
        mx = sum(u for u, _ in self.samples) / n
        my = sum(s for _, s in self.samples) / n
        var = sum((u - mx) ** 2 for u, _ in self.samples)
        slope = sum((u - mx) * (s - my) for u, s in self.samples) / var if var else 0.0
        if slope <= 0:
            return (0.0, my / mx) if extrapolate else None
        return max(my - slope * mx, 0.0), slope


def max_batch_for_tpot(fit: tuple[float, float] | None, tpot_s: float, limit: int) -> int:
    """The largest decode batch whose predicted step time stays within the TPOT target."""
    if fit is None:
        return limit
    fixed, per_seq = fit
    if per_seq <= 0:
        return limit
    return max(1, min(limit, math.floor((tpot_s - fixed) / per_seq)))


def prompt_share(fit: tuple[float, float] | None, batch: int, tpot_s: float) -> float:
    """The share of a core's time prompt tokens may take beside `batch` decoding sequences
    with their mean time per token within STEP_AIM of the TPOT target (at least
    MIN_PROMPT_SHARE). A step of pure decode
    takes d = fixed + per_seq x batch; with a share u of the time on prompts, the mean is
    d / (1 - u). (A request's TPOT is that mean: one long step among many short ones is
    fine, so prompts go in whole chunks, not slivers of every step.)"""
    if batch == 0:
        return 1.0
    fixed, per_seq = fit or (0.0, 0.0)
    return max(MIN_PROMPT_SHARE, 1 - (fixed + per_seq * batch) / (STEP_AIM * tpot_s))


class PromptPacer:
    """Paces the prompt tokens a core computes beside decoding sequences to prompt_share:
    each step earns the share of its time in credit, up to the share of `horizon_s`, and the
    time its prompt tokens added (beyond the pure decode step the fit predicts) is spent from
    it. A step takes the prompt tokens the credit pays for: chunks grow while the decodes'
    steps bank credit, and none run while it is spent, so one chunk never delays a young
    request by more than the horizon allows. It learns a prompt token's cost beside the batch
    as it goes (the first chunk is FIRST_CHUNK tokens), for `cap` and `rate`."""

    def __init__(self, tpot_s: float | None, window: int = 64, horizon_s: float = 0.25):
        self.tpot_s = tpot_s or math.inf  # no target: nothing to pace
        self.samples: deque[tuple[int, float]] = deque()
        self.window = window
        self.tokens, self.extra_s = 0, 0.0  # the samples' sums: cap() runs every step
        self.credit_s, self.horizon_s = 0.0, horizon_s

    @property
    def per_token_s(self) -> float:
        """Seconds a prompt token adds to a decode step; 0.0 before one was seen."""
        return max(self.extra_s, 0.0) / self.tokens if self.tokens else 0.0

    def observe(
        self, fit: tuple[float, float] | None, decoding: int, tokens: int, seconds: float
    ) -> None:
        """A step of `decoding` sequences and `tokens` prompt tokens took `seconds`."""
        fixed, per_seq = fit or (0.0, 0.0)
        extra = seconds - fixed - per_seq * decoding
        if tokens:
            self.samples.append((tokens, extra))
            self.tokens, self.extra_s = self.tokens + tokens, self.extra_s + extra
            if len(self.samples) > self.window:
                gone, gone_s = self.samples.popleft()
                self.tokens, self.extra_s = self.tokens - gone, self.extra_s - gone_s
        if not decoding:  # prompts delayed no one: a fresh start
            self.credit_s = max(self.credit_s, 0.0)
            return
        share = prompt_share(fit, decoding, self.tpot_s)
        earned = self.credit_s + share * seconds - (max(extra, 0.0) if tokens else 0.0)
        self.credit_s = min(earned, share * self.horizon_s)

    def cap(self, decoding: int, budget: int) -> int:
        """Prompt tokens the next step may take (Scheduler.prompt_cap)."""
        if decoding == 0 or math.isinf(self.tpot_s):
            return budget
        if self.credit_s <= 0:
            return 0
        per_token = self.per_token_s
        return min(budget, int(self.credit_s / per_token) if per_token else FIRST_CHUNK)

    def rate(self, fit: tuple[float, float] | None, decoding: int) -> float:
        """Prompt tokens a second this core computes beside `decoding` sequences; 0.0 before
        a prompt token's cost is known."""
        per_token = self.per_token_s
        return prompt_share(fit, decoding, self.tpot_s) / per_token if per_token else 0.0


class Calibration:
    """How far real TTFTs run from predictions (HTTP, queueing order, a busy machine), as
    a running ratio that scales the next predictions. Short predictions are skipped: fixed
    overheads dominate them and would inflate the ratio."""

    def __init__(self, weight: float = 0.3, bounds: tuple[float, float] = (0.5, 4.0)):
        self.ratio, self.weight, self.bounds = 1.0, weight, bounds

    def observe(self, predicted_s: float | None, actual_s: float, min_s: float = 0.05) -> None:
        if predicted_s is None or predicted_s < min_s:
            return
        ratio = (1 - self.weight) * self.ratio + self.weight * actual_s / predicted_s
        self.ratio = min(max(ratio, self.bounds[0]), self.bounds[1])


@dataclass(frozen=True)
class Admission:
    """The gateway's decision on one request."""

    admitted: bool
    predicted_ttft_s: float | None = None
    retry_after_s: int = 0
    reason: str = ""


def late_ok(predicted_s: float, own_s: float, ttft_s: float, keeping_up: bool) -> bool:
    """Whether a request predicted to miss the TTFT target is taken all the same: while the
    stack keeps up with the load (its queue drains), when it is late by its own length or by a
    queue ahead of it shorter than the target. A 429 there would turn away what the stack
    serves, only late; past capacity every predicted miss is refused, so the queue stays short
    enough for the rest to meet the target."""
    return keeping_up and predicted_s - own_s < ttft_s


def prefill_seconds(tokens: int, fit: tuple[float, float], budget: int) -> float:
    """Time to prefill `tokens` in steps of at most `budget` tokens each."""
    fixed, per_token = fit
    return math.ceil(tokens / budget) * fixed + tokens * per_token


def tokens_until_done(
    queued_tokens: int,
    prompt_tokens: int,
    budget: int,
    ahead_tokens: int | None = None,
    chunk_tokens: int = 0,
) -> int:
    """Prompt tokens a service computes until a new prompt's last one: those computed before
    its first chunk (`ahead_tokens`; unset: the whole queue, first come first served), the
    prompt itself, and what other prompts take beside its chunks of `chunk_tokens` a step."""
    ahead = queued_tokens if ahead_tokens is None else min(ahead_tokens, queued_tokens)
    beside = 0
    if ahead_tokens is not None and 0 < chunk_tokens < budget:
        steps = -(-prompt_tokens // chunk_tokens)
        beside = min(queued_tokens - ahead, steps * (budget - chunk_tokens))
    return ahead + prompt_tokens + beside


def admit(
    queued_tokens: int,
    prompt_tokens: int,
    fit: tuple[float, float] | None,
    budget: int,
    ttft_s: float,
    scale: float = 1.0,
    ahead_tokens: int | None = None,
    chunk_tokens: int = 0,
    keeping_up: bool = False,
) -> Admission:
    """Predict TTFT from the prefill's fitted step times over tokens_until_done, times the
    calibration `scale`. Refuse when it misses the target (late_ok: unless the stack is
    `keeping_up` with the load); with no fit yet, admit. Retry-After is when the whole queue
    has drained. Steps all of one size fit as a fixed cost and no slope: the prediction is then
    steps x that cost."""
    if fit is None or fit[0] + fit[1] <= 0:
        return Admission(True)
    tokens = tokens_until_done(queued_tokens, prompt_tokens, budget, ahead_tokens, chunk_tokens)
    predicted = scale * prefill_seconds(tokens, fit, budget)
    own = scale * prefill_seconds(prompt_tokens, fit, budget)
    if predicted <= ttft_s or queued_tokens == 0 or late_ok(predicted, own, ttft_s, keeping_up):
        return Admission(True, predicted)
    drain = scale * prefill_seconds(queued_tokens, fit, budget)  # when the queue has cleared
    return Admission(
        False,
        predicted,
        max(1, math.ceil(drain)),
        f"predicted time to first token {predicted:.1f}s exceeds the {ttft_s:.1f}s target",
    )
