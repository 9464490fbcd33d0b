"""The KV hand-off's metrics, counted by kvtransfer.sender and .receiver, and the transport
chosen with each peer (for /health and /metrics)."""

from prometheus_client import Counter, Gauge

from baton.protocol import HandoffEnd

KV_BYTES_SENT = Counter(
    "baton_kv_bytes_sent", "KV bytes that landed at decode services (sent or read)", ["service"]
)
KV_BYTES_RECEIVED = Counter("baton_kv_bytes_received", "KV bytes received", ["service"])
KV_TRANSFERS = Counter("baton_kv_transfers", "KV hand-offs completed", ["service"])
KV_EARLY_OFFERS = Counter(
    "baton_kv_early_offers", "KV offered while its prompt was still prefilling", ["service"]
)
LEASES_EXPIRED = Counter("baton_kv_leases_expired", "KV leases freed by expiry", ["service"])
# bytes count on both ends of a hand-off; runs (descriptors, frames, copies) where they land
KV_TRANSPORT_BYTES = Counter(
    "baton_kv_transport_bytes", "KV bytes handed off, by transport", ["service", "transport"]
)
KV_TRANSPORT_RUNS = Counter(
    "baton_kv_transport_runs",
    "contiguous block runs moved (one descriptor, frame or copy each), by transport",
    ["service", "transport"],
)
KV_PEERS = Gauge(
    "baton_kv_peers", "KV peers, by the transport chosen at the handshake", ["service", "transport"]
)


HANDOFFS = Counter(
    "baton_kv_handoffs",
    "KV hand-offs ended, by how (baton.protocol.HandoffEnd)",
    ["service", "end"],
)


def count_end(service_id: str, end: HandoffEnd) -> None:
    HANDOFFS.labels(service_id, end.name.lower()).inc()


class KVPeers:
    """The configured KV transport and the one chosen with each peer, for /health and
    /metrics (the HTTP thread reads `status`; dict copies are atomic under the GIL)."""

    def __init__(self, service_id: str, configured: str):
        self.service_id, self.configured = service_id, configured
        self.chosen: dict[str, str] = {}  # peer -> zmq-tcp | zmq-ipc | shm | nixl | refused

    def set(self, peer: str, transport: str | None) -> None:
        """Record a handshake's outcome; None forgets the peer."""
        touched = {self.chosen.get(peer), transport} - {None}
        if transport is None:
            self.chosen.pop(peer, None)
        else:
            self.chosen[peer] = transport
        for t in touched:
            KV_PEERS.labels(self.service_id, t).set(sum(v == t for v in self.chosen.values()))

    def status(self) -> dict:
        return {"transport": self.configured, "peers": dict(self.chosen)}
