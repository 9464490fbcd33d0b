"""The service plane under CURVE keys (baton.plane): a stack started with `--key-dir` serves as
before, KV over TCP included; a peer without the keys gets nothing from the gateway or a
decode; a key is bound to its role, and a service's own key to that service; a heartbeat whose
load is out of bounds is refused."""

import json
import os
import stat
import time

import msgspec
import psutil
import pytest
import zmq
from reference import ENGINE
from stack import Stack, get

from baton import plane
from baton import protocol as P
from baton.config import load_config

PROMPT = [1, 17, 42, 99, 7]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_text_model):
    root = tmp_path_factory.mktemp("plane")
    keys = root / "keys"  # `baton up` makes them there
    s = Stack(
        root / "logs", tiny_text_model, *ENGINE, "--transport", "zmq-tcp", "--key-dir", str(keys)
    )
    yield s, keys
    s.stop()


def complete(stack: Stack) -> list[int]:
    r = stack.client().completions.create(
        model="", prompt=PROMPT, max_tokens=8, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )  # fmt: skip
    return r.choices[0].token_ids


def pools(stack: Stack) -> dict:
    return json.loads(get(f"{stack.url}/health")[1])


def bad_messages(stack: Stack) -> float:
    body = get(f"{stack.url}/metrics")[1].decode()
    line = next(x for x in body.splitlines() if x.startswith("baton_gateway_bad_messages_total"))
    return float(line.split()[-1])


def test_keys_are_private_and_the_stack_serves_over_them(stack):
    s, keys = stack
    assert stat.S_IMODE(os.stat(keys).st_mode) == 0o700
    for secret in keys.glob("*.key_secret"):
        assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    # `baton up` gave each service its own key besides the pool keys
    own = {p.stem for p in (keys / "clients").glob("*.*.key")}
    assert own == {"prefill.prefill-0", "decode.decode-0"}
    assert len(complete(s)) == 8  # prefill -> decode over CURVE TCP, tokens back over CURVE
    # the effective config every child reads may hold the API key: this user's only (M9)
    assert stat.S_IMODE(os.stat(s.log_dir / "config.toml").st_mode) == 0o600


def heartbeat(service_id: str, role: str, queued: int = 0) -> bytes:
    load = msgspec.structs.replace(P.Load(0, 0, 64, 64), queued_tokens=queued)
    return msgspec.msgpack.encode(P.Heartbeat(service_id, role, "", load))


def peer(
    ctx: zmq.Context, addr: str, identity: str, keys: plane.Keys | None = None, role="", key_of=""
):
    """A DEALER as `identity`, with a key from `keys` (None: no key at all): service
    `key_of`'s own where given, else `role`'s pool key."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity.encode())
    if keys is not None:
        keys.connect_as(sock, role, key_of)
    sock.connect(addr)
    return sock


def wait_bad(stack: Stack, count: float) -> None:
    deadline = time.monotonic() + 10
    while bad_messages(stack) < count:
        assert time.monotonic() < deadline, "the keyed messages never arrived"
        time.sleep(0.2)


@pytest.fixture
def intruders(stack):
    """The stack, its key directory, its gateway's plane address, and a context for peers
    that try to get in (destroyed after)."""
    s, keys = stack
    ctx = zmq.Context()
    yield s, keys, load_config(s.log_dir / "config.toml").gateway.zmq_addr, ctx
    ctx.destroy(linger=0)


def test_a_peer_without_the_keys_gets_nothing_and_a_key_is_bound_to_its_role(intruders):
    s, keys, gateway_addr, ctx = intruders
    before, bad = pools(s), bad_messages(s)
    # no key: the handshake fails, the gateway never sees a byte (not even as garbage)
    plain = peer(ctx, gateway_addr, "plain/heartbeats")
    for _ in range(5):
        plain.send(heartbeat("plain", "prefill"))
    # a key of its own, with the server's public key (which is no secret): ZAP says no
    stranger_keys = plane.Keys(plane.generate(keys.parent / "stranger"))
    stranger_keys.server_public = plane.Keys(keys).server_public
    stranger = peer(ctx, gateway_addr, "stranger/heartbeats", stranger_keys, "prefill")
    stranger.send(heartbeat("stranger", "prefill"))
    # a decode's key claiming to be a prefill, and a prefill's key with an absurd load:
    # both arrive, and both are refused (counted)
    liar = peer(ctx, gateway_addr, "liar/heartbeats", plane.Keys(keys), "decode")
    liar.send(heartbeat("liar", "prefill"))
    greedy = peer(ctx, gateway_addr, "greedy/heartbeats", plane.Keys(keys), "prefill")
    greedy.send(heartbeat("greedy", "prefill", -(10**9)))
    wait_bad(s, bad + 2)
    time.sleep(1)  # the keyless heartbeats had every chance to arrive
    assert bad_messages(s) == bad + 2
    assert pools(s) == before  # nobody joined
    assert len(complete(s)) == 8

    # a decode's KV socket (tcp, the only port it listens on besides its probe): a
    # keyless Hello gets no answer, and a keyed peer of the wrong role is counted
    decode = s.services("decode")["decode-0"]
    probe_port = int(decode["url"].rsplit(":", 1)[1])
    (kv_port,) = {
        c.laddr.port for c in psutil.Process(decode["pid"]).net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port != probe_port
    }  # fmt: skip
    hello = msgspec.msgpack.encode(P.KeepAlive())
    intruder = peer(ctx, f"tcp://127.0.0.1:{kv_port}", "intruder")
    intruder.send(hello)
    assert not intruder.poll(2000)
    assert len(complete(s)) == 8


def test_a_services_own_key_speaks_for_that_service_alone(intruders):
    s, keys, gateway_addr, ctx = intruders
    before, bad = pools(s), bad_messages(s)
    # prefill-0's own key (say, leaked from its host) claiming another prefill's id
    impostor = peer(
        ctx, gateway_addr, "prefill-7/heartbeats", plane.Keys(keys), "prefill", "prefill-0"
    )
    impostor.send(heartbeat("prefill-7", "prefill"))
    # the same key sending tokens as a decode (a socket's identity is the client's to
    # choose): refused before any stream could see them
    forger = peer(ctx, gateway_addr, "decode-3", plane.Keys(keys), "prefill", "prefill-0")
    forger.send(msgspec.msgpack.encode(P.TokenOutput("nobody", 1, 5)))
    wait_bad(s, bad + 2)
    # a key issued while the gateway runs is read when it first knocks: its heartbeat
    # gets past the handshake, and (its load absurd) is counted, not taken
    plane.issue(keys, "prefill", "prefill-5")
    late = peer(ctx, gateway_addr, "prefill-5/heartbeats", plane.Keys(keys), "prefill", "prefill-5")
    late.send(heartbeat("prefill-5", "prefill", -(10**9)))
    wait_bad(s, bad + 3)
    time.sleep(1)
    assert bad_messages(s) == bad + 3
    assert pools(s) == before  # nobody joined
    assert len(complete(s)) == 8
