"""Admission: accept a request only if it can meet the TTFT target, else 429 at once.

Two checks, in order: the count of requests in flight (`max_queued_requests`), then, under the
`slo` policy, the TTFT the prefill its prompts are placed on would give them, predicted from
that prefill's measured step times (baton.slo.admit). Where the prompts go is the router's
call (gateway/router.py), made before: admission only says yes or no to it.
"""

from dataclasses import dataclass

from baton.config import GatewayConfig, SLOConfig
from baton.gateway import metrics as M
from baton.gateway.router import Placement, prefill_cost
from baton.slo import Calibration, admit, late_ok


class Overloaded(RuntimeError):
    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class Admitted:
    placements: list[Placement]  # one per prompt
    predicted_ttft_s: float | None = None
    released: bool = False  # its prompts no longer count as in flight (Backend.release)


class Admission:
    def __init__(self, gateway: GatewayConfig, slo: SLOConfig):
        self.max_inflight = gateway.max_queued_requests
        self.policy = gateway.admission
        self.keeping_up_below = gateway.admission_load
        # aim below the target: the requests admitted last sit at the prediction's edge
        self.ttft_s = gateway.admission_margin * slo.ttft_ms / 1000
        self.calibration = Calibration()

    def observe(self, admitted: Admitted, ttft_s: float) -> None:
        """A request's real TTFT: corrects the next predictions."""
        if admitted.predicted_ttft_s:  # how far the prediction was off, as predicted
            M.TTFT_PREDICTION_ERROR.observe(ttft_s / admitted.predicted_ttft_s)
        self.calibration.observe(admitted.predicted_ttft_s, ttft_s)
        M.TTFT_CALIBRATION.set(self.calibration.ratio)

    def check(self, inflight: int, placements: list[Placement], load: float = 0.0) -> Admitted:
        """Takes a request placed so, or raises Overloaded. Prompts prefilled on their decode
        count against the in-flight limit, and against the TTFT target where it was predicted
        (Placement.wait_s). `load`: the offered load (Autoscaler.offered_load); below
        `admission_load` a predicted miss may still be taken (baton.slo.late_ok)."""
        if inflight + len(placements) > self.max_inflight:
            M.REJECTED.labels("queue_full").inc()
            raise Overloaded(f"{inflight} requests in flight (limit {self.max_inflight})", 1)
        if self.policy != "slo":
            return Admitted(placements)
        keeping_up = load < self.keeping_up_below
        stolen = self.check_stolen(placements, keeping_up)
        remote = [p for p in placements if p.prefill is not None]
        if not remote:
            return Admitted(placements, stolen)
        # the least loaded of its prefills, with all of its prompts: a bound, not a split
        p = min((r.prefill for r in remote), key=prefill_cost)
        if p.load.step_fixed_s + p.load.step_per_unit_s <= 0:  # not measured yet
            return Admitted(placements)
        fit = (p.load.step_fixed_s, p.load.step_per_unit_s)
        tokens = sum(r.num_tokens for r in remote)
        budget = p.load.step_budget or tokens
        scale = self.calibration.ratio
        ahead = p.load.ahead_tokens + p.inflight_tokens
        queued = int(prefill_cost(p))
        decision = admit(
            queued, tokens, fit, budget, self.ttft_s, scale, ahead, p.load.chunk_tokens, keeping_up
        )
        M.PREDICTED_TTFT.observe(decision.predicted_ttft_s or 0.0)
        if not decision.admitted:
            M.REJECTED.labels("ttft_slo").inc()
            raise Overloaded(decision.reason, decision.retry_after_s)
        return Admitted(placements, max(decision.predicted_ttft_s or 0.0, stolen or 0.0))

    def check_stolen(self, placements: list[Placement], keeping_up: bool) -> float | None:
        """The predicted TTFT of the prompts a decode's core computes (stolen, or with no
        prefill to take them), or Overloaded when it misses the target behind other prompts
        there (the router stole them because every prefill would be later still). A decode
        with no prompts of its own takes any."""
        stolen = [p for p in placements if p.wait_s is not None]
        if not stolen:
            return None
        worst = max(stolen, key=lambda p: p.wait_s or 0.0)
        predicted = self.calibration.ratio * (worst.wait_s or 0.0)
        own = self.calibration.ratio * (worst.own_s or 0.0)
        M.PREDICTED_TTFT.observe(predicted)
        if (
            predicted > self.ttft_s
            and worst.decode.local_tokens > 0
            and not late_ok(predicted, own, self.ttft_s, keeping_up)
        ):
            M.REJECTED.labels("ttft_slo").inc()
            why = f"predicted time to first token {predicted:.1f}s exceeds the {self.ttft_s:.1f}s"
            raise Overloaded(why + " target", max(1, int(predicted)))
        return predicted
