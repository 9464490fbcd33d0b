"""The service plane as a prefill or decode sees it: its link to the gateway (requests and
aborts down, tokens up), its heartbeats from their own thread, and sends that never block."""

import functools
import ipaddress
import socket
import threading
import time
from typing import TYPE_CHECKING

import msgspec
import zmq
from prometheus_client import Counter

from baton import protocol as P
from baton.plane import Keys

if TYPE_CHECKING:
    from baton.service_io import ServiceLoop

HEARTBEAT_S = 0.5  # service -> gateway
STALL_S = 30.0  # a loop that has not ticked for this long is stuck: heartbeats stop
SENDS_DROPPED = Counter(
    "baton_sends_dropped",
    "messages dropped: the peer took none (its queue full)",
    ["service", "peer"],
)
MAX_REQUEST_BYTES = 64 << 20  # a message from the gateway: a request's prompt, at most
# messages queued to the gateway at most (a token message is ~100 bytes): a gateway that is
# slow for a moment loses nothing, one that is gone costs a bounded queue, never a stuck loop
GATEWAY_HWM = 100_000


def send_nowait(
    sock: zmq.Socket, frames: list, service_id: str, peer: str, copy: bool = True
) -> bool:
    """Send without ever blocking a service loop; False (counted) where the peer's queue is
    full: a peer that went away, or stopped reading."""
    try:
        sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=copy)
    except zmq.Again:
        SENDS_DROPPED.labels(service_id, peer).inc()
        return False
    return True


class GatewayLink:
    """DEALER to the gateway's ROUTER: tokens and heartbeats up, requests and aborts down."""

    def __init__(
        self,
        ctx: zmq.Context,
        gateway_addr: str,
        service_id: str,
        codec: P.Codec,
        keys: Keys | None,
        role: str,
    ):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, service_id.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, GATEWAY_HWM)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        if keys is not None:
            keys.connect_as(self.sock, role, service_id)
        self.sock.connect(gateway_addr)
        self.codec, self.id = codec, service_id

    def send(self, msg) -> bool:
        return send_nowait(self.sock, [self.codec.encode(msg)], self.id, "gateway")

    def recv_all(self) -> list:
        out = []
        while self.sock.poll(0):
            if (msg := self.codec.try_decode(self.sock.recv())) is not None:
                out.append(msg)
        return out


class Every:
    """A period timer for work done from the loop: `due()` is true at most once a period."""

    def __init__(self, period_s: float):
        self.period_s = period_s
        self.next = 0.0

    def due(self) -> bool:
        now = time.monotonic()
        if now < self.next:
            return False
        self.next = now + self.period_s
        return True


class Heartbeats(threading.Thread):
    """Heartbeats from their own thread and socket: one engine step can take seconds on a
    CPU (a long prompt chunk), which must not read as a death. They carry the loop's latest
    snapshot, and stop when the loop has not ticked for STALL_S, so a stuck service is
    dropped like a dead one."""

    def __init__(self, ctx: zmq.Context, gateway_addr: str, loop: "ServiceLoop"):
        super().__init__(daemon=True, name="heartbeats")
        self.sock = ctx.socket(zmq.DEALER)  # zmq sockets are per thread
        self.sock.setsockopt(zmq.IDENTITY, f"{loop.id}/heartbeats".encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        if loop.keys is not None:
            loop.keys.connect_as(self.sock, loop.role, loop.id)
        self.sock.connect(gateway_addr)
        self.loop, self.encode = loop, msgspec.msgpack.Encoder().encode
        self.wake = threading.Event()
        self.stopped = False

    def run(self) -> None:
        while not self.stopped:
            if time.monotonic() - self.loop.last_tick < STALL_S:
                send_nowait(self.sock, [self.encode(self.loop.heartbeat)], self.loop.id, "gateway")
            self.wake.wait(HEARTBEAT_S)
            self.wake.clear()
        self.sock.close()

    def stop(self) -> None:
        """Ends the thread, which closes its own socket: a service run inside another program
        (a test) can then destroy its context without a send racing the close."""
        self.stopped = True
        self.wake.set()
        self.join()


def advertised(endpoint: str, gateway_addr: str) -> str:
    """A bound endpoint as peers can reach it: a wildcard host (tcp://0.0.0.0:6000, as in a
    container) becomes this host's own address. Refused: a loopback address to a gateway on
    another host (its prefills could be anywhere but here), and a wildcard where the host
    name resolves to a loopback address (Debian's 127.0.1.1; L4)."""
    host = tcp_host(endpoint)
    if host is None:  # ipc: this host only, as its gateway knows
        return endpoint
    if host not in ("0.0.0.0", "*", "[::]"):
        gateway = tcp_host(gateway_addr)
        if loopback(host) and gateway is not None and not loopback(gateway):
            raise SystemExit(
                f"{endpoint} is a loopback address, but the gateway ({gateway_addr}) is on "
                "another host, and so may be the prefills: bind the address they reach this "
                "host by (e.g. --kv-addr tcp://10.0.0.5:6000, or tcp://0.0.0.0:6000)"
            )
        return endpoint
    own = socket.gethostbyname(socket.gethostname())
    if loopback(own):
        raise SystemExit(
            f"{endpoint} binds every interface, but this host's name resolves to {own}, "
            "a loopback address that peers on other hosts cannot reach: bind the address "
            "they reach it by (e.g. --kv-addr tcp://10.0.0.5:6000)"
        )
    return endpoint.replace(host, own, 1)


def tcp_host(endpoint: str) -> str | None:
    """The host of a tcp:// endpoint (None for ipc:// and the like)."""
    if not endpoint.startswith("tcp://"):
        return None
    return endpoint.removeprefix("tcp://").rpartition(":")[0]


def loopback(host: str) -> bool:
    """Whether a host name or address is this host's loopback (a name that does not resolve
    here is taken for another host's)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name
        pass
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except OSError:
        return False


@functools.lru_cache(maxsize=256)
def on_this_host(endpoint: str) -> bool:
    """Whether a peer's endpoint is this host's (ipc, or an address an interface here holds:
    a socket binds to it)."""
    host = tcp_host(endpoint)
    if host is None:
        return True
    try:
        family, _, _, _, addr = socket.getaddrinfo(host.strip("[]"), 0)[0]
        with socket.socket(family) as s:
            s.bind(addr)
        return True
    except OSError:
        return False
