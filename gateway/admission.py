"""Admission: accept a request only if it can meet the TTFT target, else 429 at once.

Two checks, in order: the count of requests in flight (`max_queued_requests`), then, under the
`slo` policy, the TTFT the least-loaded prefill would give this prompt, predicted from that
prefill's measured step times (baton.slo.admit).
"""

from dataclasses import dataclass

from baton.config import GatewayConfig, SLOConfig
from baton.gateway import metrics as M
from baton.gateway.router import Registry, prefill_cost
from baton.slo import Calibration, admit


class Overloaded(RuntimeError):
    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class Admitted:
    prefills: list[str | None]  # per prompt: the prefill it is reserved on
    predicted_ttft_s: float | None = None


class Admission:
    def __init__(self, gateway: GatewayConfig, slo: SLOConfig):
        self.max_inflight = gateway.max_queued_requests
        self.policy = gateway.admission
        # aim below the target: the requests admitted last sit at the prediction's edge
        self.ttft_s = gateway.admission_margin * slo.ttft_ms / 1000
        self.calibration = Calibration()

    def observe(self, admitted: Admitted, ttft_s: float) -> None:
        """A request's real TTFT: corrects the next predictions."""
        self.calibration.observe(admitted.predicted_ttft_s, ttft_s)
        M.TTFT_CALIBRATION.set(self.calibration.ratio)

    def check(
        self, registry: Registry, inflight: int, num_prompts: int, remote: list[list[int]]
    ) -> Admitted:
        """The prefill each `remote` prompt is reserved on (None: none registered); raises
        Overloaded instead when the request should not be taken. Prompts prefilled on their
        decode count against the in-flight limit only."""
        if inflight + num_prompts > self.max_inflight:
            M.REJECTED.labels("queue_full").inc()
            raise Overloaded(f"{inflight} requests in flight (limit {self.max_inflight})", 1)
        if not remote:
            return Admitted([])
        predicted = None
        p = min(registry.pool("prefill"), key=prefill_cost, default=None)
        measured = p is not None and p.load.step_fixed_s + p.load.step_per_unit_s > 0
        if self.policy == "slo" and measured:
            fit = (p.load.step_fixed_s, p.load.step_per_unit_s)
            tokens = sum(map(len, remote))
            budget = p.load.step_budget or tokens
            scale = self.calibration.ratio
            ahead = p.load.ahead_tokens + p.inflight_tokens
            queued = int(prefill_cost(p))
            chunk = p.load.chunk_tokens
            decision = admit(queued, tokens, fit, budget, self.ttft_s, scale, ahead, chunk)
            predicted = decision.predicted_ttft_s
            M.PREDICTED_TTFT.observe(predicted or 0.0)
            if not decision.admitted:
                M.REJECTED.labels("ttft_slo").inc()
                raise Overloaded(decision.reason, decision.retry_after_s)
        reserved = [registry.pick_prefill(len(ids)) for ids in remote]
        return Admitted([s.id if s else None for s in reserved], predicted)
