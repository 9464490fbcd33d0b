"""Gateway metrics (prometheus-client), plus per-service KV gauges fed by heartbeats."""

import contextlib

from prometheus_client import Counter, Gauge, Histogram

from baton import protocol as P

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)

REQUESTS = Counter("baton_requests", "HTTP generation requests by outcome", ["status"])
TTFT = Histogram("baton_ttft_seconds", "time to first token", buckets=LATENCY_BUCKETS)
TPOT = Histogram(
    "baton_tpot_seconds", "time per output token after the first", buckets=LATENCY_BUCKETS
)
E2E = Histogram("baton_e2e_seconds", "request latency, end to end", buckets=LATENCY_BUCKETS)
INFLIGHT = Gauge("baton_inflight_requests", "requests in flight at the gateway")
SESSIONS = Gauge("baton_live_sessions", "agent sessions whose KV is kept (seen within their TTL)")
SERVICE_QUEUE = Gauge(
    "baton_service_queued_tokens", "prompt tokens queued per service", ["service", "role"]
)
SERVICE_BLOCKS_USED = Gauge(
    "baton_service_kv_blocks_used", "KV blocks held per service", ["service", "role"]
)
SERVICE_BLOCKS_TOTAL = Gauge(
    "baton_service_kv_blocks_total", "KV pool size per service", ["service", "role"]
)
PROMPT_TOKENS = Counter("baton_prompt_tokens", "prompt tokens of admitted requests")
GENERATION_TOKENS = Counter("baton_generation_tokens", "tokens streamed to clients")
LOCAL_PREFILLS = Counter(
    "baton_local_prefills_routed",
    "prompts sent to prefill on their decode, by why: short, cached (it holds the prefix), stolen",
    ["why"],
)
for _why in ("short", "cached", "stolen"):
    LOCAL_PREFILLS.labels(_why)
MIGRATIONS = Counter("baton_migrations", "streams resumed on other services after a failure")
REJECTED = Counter("baton_admission_rejected", "requests refused with 429", ["reason"])
for _reason in ("queue_full", "ttft_slo"):  # exported from the start, at zero
    REJECTED.labels(_reason)
TTFT_CALIBRATION = Gauge(
    "baton_ttft_calibration", "real TTFT / predicted, scaling admission's predictions"
)
PREDICTED_TTFT = Histogram(
    "baton_predicted_ttft_seconds", "TTFT predicted at admission", buckets=LATENCY_BUCKETS
)
TTFT_PREDICTION_ERROR = Histogram(
    "baton_ttft_prediction_error",
    "real TTFT / the TTFT admission predicted for it (1 = exact; before calibration scales it)",
    buckets=(0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0),
)
SERVICES = Gauge("baton_services", "live services per role", ["role"])
DESIRED_REPLICAS = Gauge(
    "baton_desired_replicas",
    "services each pool wants for the load now (gateway/autoscale.py): an autoscaler's target "
    "(under `baton up --autoscale`, its shares of the cores)",
    ["pool"],
)
BAD_MESSAGES = Counter("baton_gateway_bad_messages", "malformed service messages dropped")
ORPHANS_ABORTED = Counter(
    "baton_orphans_aborted", "requests aborted on their service because no client waits for them"
)


PER_SERVICE = (SERVICE_QUEUE, SERVICE_BLOCKS_USED, SERVICE_BLOCKS_TOTAL)


def observe_heartbeat(hb: P.Heartbeat) -> None:
    labels = (hb.service_id, hb.role)
    SERVICE_QUEUE.labels(*labels).set(hb.load.queued_tokens)
    SERVICE_BLOCKS_USED.labels(*labels).set(hb.load.total_blocks - hb.load.free_blocks)
    SERVICE_BLOCKS_TOTAL.labels(*labels).set(hb.load.total_blocks)


def forget_service(service_id: str, role: str) -> None:
    """A dead service's series go (reliability review L1)."""
    for gauge in PER_SERVICE:
        with contextlib.suppress(KeyError):  # it never sent a heartbeat it was observed by
            gauge.remove(service_id, role)
