"""What the SLO targets turn into, as plain Python: measured step-time models, a TTFT
prediction for admission, and a decode batch cap for TPOT.

Services measure every engine step and report the fitted figures in their heartbeats; the
gateway and the decode scheduler act on them. Nothing here knows about sockets or torch.
"""

import math
from collections import deque
from dataclasses import dataclass

# A step that computes prompt tokens beside decoding sequences aims at this share of the TPOT
# target: a request's TPOT averages its steps, and the fit's guess can run short.
STEP_AIM = 0.8
# The fewest prompt tokens such a step takes: a prompt always advances, however full the batch.
MIN_PROMPT_CHUNK = 16


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
        """(fixed, per_unit), or None before two steps were seen. With one size only, all of
        the time is taken as per-unit cost (a cautious guess at larger sizes), unless
        `extrapolate` is off: then None until two distinct sizes were seen."""
        n = len(self.samples)
        if n < 2:
            return None
        mx = sum(u for u, _ in self.samples) / n
        my = sum(s for _, s in self.samples) / n
        var = sum((u - mx) ** 2 for u, _ in self.samples)
        if var == 0:
            return (0.0, my / mx) if extrapolate else None
        slope = sum((u - mx) * (s - my) for u, s in self.samples) / var
        slope = max(slope, 0.0)
        return max(my - slope * mx, 0.0), slope


def max_batch_for_tpot(fit: tuple[float, float] | None, tpot_s: float, limit: int) -> int:
    """The largest decode batch whose predicted step time stays within the TPOT target."""
    if fit is None:
        return limit
    fixed, per_seq = fit
    if per_seq <= 0:
        return limit
    return max(1, min(limit, math.floor((tpot_s - fixed) / per_seq)))


class PromptCost:
    """Seconds one prompt token adds to a decode step: over the last `window` steps that
    computed prompt tokens, what they took beyond the decode fit's time for their batch, per
    prompt token."""

    def __init__(self, window: int = 64):
        self.samples: deque[tuple[int, float]] = deque(maxlen=window)

    def observe(self, tokens: int, extra_s: float) -> None:
        if tokens > 0:
            self.samples.append((tokens, extra_s))

    @property
    def per_token_s(self) -> float:
        """0.0 before a step with prompt tokens was seen."""
        tokens = sum(n for n, _ in self.samples)
        return max(sum(s for _, s in self.samples), 0.0) / tokens if tokens else 0.0


def prompt_tokens_beside(
    fit: tuple[float, float] | None, per_token_s: float, batch: int, tpot_s: float, limit: int
) -> int:
    """Prompt tokens a decode step may compute beside `batch` decoding sequences and still end
    within STEP_AIM of the TPOT target (fit: the pure decode step, seconds ~= fixed + per_seq x
    batch). With nothing decoding, the whole `limit`; before the cost of a prompt token is
    known, MIN_PROMPT_CHUNK, whose step measures it."""
    if batch == 0:
        return limit
    if per_token_s <= 0:
        return MIN_PROMPT_CHUNK
    fixed, per_seq = fit or (0.0, 0.0)
    room = STEP_AIM * tpot_s - fixed - per_seq * batch
    return max(MIN_PROMPT_CHUNK, int(min(limit, room / per_token_s)))


def prompt_rate(
    fit: tuple[float, float] | None, per_token_s: float, batch: int, tpot_s: float, limit: int
) -> float:
    """Prompt tokens a second a decode computes beside `batch` decoding sequences, each step
    taking prompt_tokens_beside(...) of them; 0.0 while a prompt token's cost is unknown."""
    if per_token_s <= 0:
        return 0.0
    fixed, per_seq = fit or (0.0, 0.0)
    n = prompt_tokens_beside(fit, per_token_s, batch, tpot_s, limit)
    return n / (fixed + per_seq * batch + per_token_s * n)


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


def prefill_seconds(tokens: int, fit: tuple[float, float], budget: int) -> float:
    """Time to prefill `tokens` in steps of at most `budget` tokens each."""
    fixed, per_token = fit
    return math.ceil(tokens / budget) * fixed + tokens * per_token


def admit(
    queued_tokens: int,
    prompt_tokens: int,
    fit: tuple[float, float] | None,
    budget: int,
    ttft_s: float,
    scale: float = 1.0,
    ahead_tokens: int | None = None,
    chunk_tokens: int = 0,
) -> Admission:
    """Predict TTFT from the prefill's fitted step times: the tokens this prompt waits for
    (`ahead_tokens`; unset: the whole queue, first come first served), the prompt itself and
    what other prompts take beside its chunks, times the calibration `scale`. Refuse when it
    misses the target; with no fit yet, admit. Retry-After is when the whole queue has
    drained. Steps all of one size fit as a fixed cost and no slope: the prediction is then
    steps x that cost."""
    if fit is None or fit[0] + fit[1] <= 0:
        return Admission(True)
    ahead = queued_tokens if ahead_tokens is None else min(ahead_tokens, queued_tokens)
    beside = 0  # once it runs, a prompt of `chunk_tokens` a step shares each step with others
    if ahead_tokens is not None and 0 < chunk_tokens < budget:
        steps = -(-prompt_tokens // chunk_tokens)
        beside = min(queued_tokens - ahead, steps * (budget - chunk_tokens))
    predicted = scale * prefill_seconds(ahead + prompt_tokens + beside, fit, budget)
    if predicted <= ttft_s or queued_tokens == 0:  # an idle prefill takes even a long prompt
        return Admission(True, predicted)
    drain = scale * prefill_seconds(queued_tokens, fit, budget)  # when the queue has cleared
    return Admission(
        False,
        predicted,
        max(1, math.ceil(drain)),
        f"predicted time to first token {predicted:.1f}s exceeds the {ttft_s:.1f}s target",
    )
