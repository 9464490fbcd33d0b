"""What the prefill and decode services share around their loops: the gateway link
(register + heartbeats + token messages), the health/metrics HTTP probe, and KV metrics."""

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import msgspec
import zmq
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, generate_latest

from baton import protocol as P

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5  # service -> gateway
KEEPALIVE_S = 1.0  # between KV peers; renews leases

KV_BLOCKS_USED = Gauge("baton_kv_blocks_used", "KV blocks held", ["service"])
KV_BLOCKS_TOTAL = Gauge("baton_kv_blocks_total", "KV blocks in the pool", ["service"])
KV_BYTES_SENT = Counter("baton_kv_bytes_sent", "KV bytes sent to decode services", ["service"])
KV_BYTES_RECEIVED = Counter("baton_kv_bytes_received", "KV bytes received", ["service"])
KV_TRANSFERS = Counter("baton_kv_transfers", "KV hand-offs completed", ["service"])
RECOMPUTES = Counter("baton_recomputes", "sequences preempted and recomputed", ["service"])
LEASES_EXPIRED = Counter("baton_kv_leases_expired", "KV leases freed by expiry", ["service"])
REQUEST_ERRORS = Counter("baton_request_errors", "requests failed by this service", ["service"])
BAD_MESSAGES = Counter("baton_bad_messages", "malformed messages dropped", ["service"])


class GatewayLink:
    """DEALER to the gateway's ROUTER: tokens and heartbeats up, requests and aborts down."""

    def __init__(self, ctx: zmq.Context, gateway_addr: str, service_id: str):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, service_id.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(gateway_addr)
        self.codec = P.Codec(P.ToService)
        self.service_id = service_id
        self.next_heartbeat = 0.0

    def send(self, msg) -> None:
        self.sock.send(self.codec.encode(msg))

    def recv_all(self) -> list:
        out = []
        while self.sock.poll(0):
            raw = self.sock.recv()
            try:
                out.append(self.codec.decode(raw))
            except msgspec.DecodeError as e:
                BAD_MESSAGES.labels(self.service_id).inc()
                log.warning("dropped a malformed message from the gateway: %s", e)
        return out

    def heartbeat_due(self) -> bool:
        now = time.monotonic()
        if now < self.next_heartbeat:
            return False
        self.next_heartbeat = now + HEARTBEAT_S
        return True


def serve_probe(port: int, status) -> ThreadingHTTPServer:
    """GET /health (200 with the load while the loop ticks, else 503) and GET /metrics."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/metrics":
                code, body, ctype = 200, generate_latest(), CONTENT_TYPE_LATEST
            elif self.path == "/health":
                ok, info = status()
                code, body, ctype = (
                    (200 if ok else 503),
                    json.dumps(info).encode(),
                    "application/json",
                )
            else:
                code, body, ctype = 404, b"not found", "text/plain"
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
