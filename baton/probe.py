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


class Probe(ThreadingHTTPServer):
    status: Status = staticmethod(starting)  # the service's own, once it exists


class Handler(BaseHTTPRequestHandler):
    server: Probe

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
