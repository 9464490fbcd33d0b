"""A real PrefillService in the test's process; the test plays its gateway and its decode."""

import time
from collections.abc import Callable

import zmq

from baton import protocol as P
from baton.engine import Engine
from baton.prefill.service import PrefillService
from baton.sampling_params import SamplingParams


class PrefillHarness:
    """The decode side accepts the handshake (after a garbage frame, which the prefill must
    count and drop) and records every message the prefill sends it; with `release`, it lets
    go of each final offer at once, as if it had copied the blocks."""

    def __init__(self, engine: Engine, service_id: str, release: bool = True):
        self.ctx = zmq.Context()
        self.gateway, self.decode = self.ctx.socket(zmq.ROUTER), self.ctx.socket(zmq.ROUTER)
        for s in (self.gateway, self.decode):
            s.setsockopt(zmq.LINGER, 0)
            s.bind("tcp://127.0.0.1:*")
        self.decode_addr = self.decode.getsockopt_string(zmq.LAST_ENDPOINT)
        gateway_addr = self.gateway.getsockopt_string(zmq.LAST_ENDPOINT)
        self.id = service_id  # metrics are per process: one id per test keeps them apart
        self.service = PrefillService(engine, service_id, gateway_addr, "zmq-tcp")
        self.up = P.Codec(P.ToGateway)
        self.kv = P.Codec(P.PrefillToDecode)
        self.release = release
        self.received: list = []  # what reached the decode, in order
        self.decode_identity = b""
        self.num_bad_sent = 0  # garbage the decode side sent; the prefill must count it
        # its first heartbeat: the links are up, so the gateway can route to it by name
        self.service.start_heartbeats()
        self.wait(P.Heartbeat)

    def send(self, *frames: bytes) -> None:
        self.gateway.send_multipart([self.id.encode(), *frames])

    def request(self, req_id: str, **fields) -> None:
        fields = {"token_ids": [1, 5, 9, 200], "decode_id": "decode-fuzz",
                  "params": SamplingParams(max_tokens=4, temperature=0),
                  "decode_kv_addr": self.decode_addr, **fields}  # fmt: skip
        self.send(self.up.encode(P.PrefillRequest(req_id, **fields)))

    def wait(self, kind: type, req_id: str | None = None, timeout_s: float = 20):
        """Step the prefill until it sends the gateway a `kind` message (for `req_id`)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.service.step()
            self.play_decode()
            while self.gateway.poll(0):
                msg = self.up.decode(self.gateway.recv_multipart()[-1])
                if isinstance(msg, kind) and (req_id is None or msg.req_id == req_id):
                    return msg
        raise TimeoutError(f"no {kind.__name__} for {req_id}")

    def step_until(self, done: Callable[[], bool], timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError("the prefill never got there")
            self.service.step()
            self.play_decode()

    def play_decode(self) -> None:
        while self.decode.poll(0):
            self.decode_identity, raw = self.decode.recv_multipart()
            msg = self.kv.decode(raw)
            self.received.append(msg)
            if isinstance(msg, P.Hello):
                self.reply(b"\xc1garbage")
                self.num_bad_sent += 1
                self.reply(self.kv.encode(P.HelloReply(True)))
            elif isinstance(msg, P.KVOffer) and msg.final and self.release:
                self.reply(self.kv.encode(P.KVRelease(msg.req_id)))

    def reply(self, raw: bytes) -> None:
        self.decode.send_multipart([self.decode_identity, raw])

    def settle(self, timeout_s: float = 10) -> int:
        """Step until every hand-off is released; the KV blocks still used."""
        pool = self.service.engine.kv_manager.pool
        deadline = time.monotonic() + timeout_s
        while pool.num_used and time.monotonic() < deadline:
            self.service.step()
            self.play_decode()
        return pool.num_used

    def close(self) -> None:
        self.service.heartbeater.stop()
        for ctx in (self.ctx, self.service.ctx):  # an open socket would hold up the exit
            ctx.destroy(linger=0)
