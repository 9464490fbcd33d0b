"""A service's health/metrics HTTP probe: GET /health and GET /metrics.

Served before the model loads (this module imports no torch), so the port is held from the
process's first moment and /health answers 503 "starting" until the service is attached.
"""

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

Status = Callable[[], tuple[bool, dict]]


def starting() -> tuple[bool, dict]:
    return False, {"status": "starting"}


MAX_CONNECTIONS = 16  # at once: more than any scraper and orchestrator open together
TIMEOUT_S = 10  # a connection that sends nothing for this long is closed


class Probe(ThreadingHTTPServer):
    """A thread per connection, at most MAX_CONNECTIONS of them: idle connections cannot pile
    up threads without limit (review L5); one past the cap is closed at once."""

    status: Status = staticmethod(starting)  # the service's own, once it exists
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type) -> None:
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: it would have released the slot
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class Handler(BaseHTTPRequestHandler):
    server: Probe
    timeout = TIMEOUT_S

    def do_GET(self) -> None:
        if self.path == "/metrics":
            code, body, ctype = 200, generate_latest(), CONTENT_TYPE_LATEST
        elif self.path == "/health":
            ok, info = self.server.status()
            code, body, ctype = (200 if ok else 503), json.dumps(info).encode(), "application/json"
        else:
            code, body, ctype = 404, b"not found", "text/plain"
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def serve_probe(port: int, host: str = "127.0.0.1") -> Probe:
    """On loopback unless a host is given (a container's probe port is scraped from outside).
    /health: 503 while starting; then 200 with the load while the loop ticks, else 503."""
    server = Probe((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
