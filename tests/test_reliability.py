"""The reliability review's findings (shared/research/review-reliability-2026-12.md), each as
the test it proposes: a routine operation never hangs a service."""

import json
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from prefill_harness import PrefillHarness
from prometheus_client import REGISTRY
from stack import Stack, free_port, get

from baton import probe
from baton import protocol as P
from baton.config import EngineConfig
from baton.engine import Engine
from baton.kvtransfer import shm
from baton.logs import ThrottledLog
from baton.probe import serve_probe
from baton.service_links import Every

POISON = 4242  # a token id the broken runner below cannot take
MAX_QUEUED = 8  # the reliability stack's [gateway] max_queued_requests


def test_m12_a_step_that_raises_fails_its_requests_and_the_service_goes_on(tiny_text_model):
    """M12: any exception in a step ended the process with every stream in it, and failover
    took the request that caused it to the next service, and the next."""
    config = EngineConfig(model=str(tiny_text_model), dtype="float32", num_blocks=32)
    h = PrefillHarness(Engine.build(config), "prefill-m12")
    runner = h.service.engine.runner
    real_run = runner.run

    def broken_run(batch):  # as a kernel bug on one input would
        if any(POISON in s.seq.token_ids for s in batch):
            raise RuntimeError("a kernel bug")
        return real_run(batch)

    runner.run = broken_run
    try:
        h.request("poison", token_ids=[1, POISON, 9])
        error = h.wait(P.RequestError, "poison")
        assert not error.retryable and "the engine failed" in error.message
        assert "a kernel bug" in error.message
        h.request("fine")
        assert h.wait(P.TokenOutput, "fine").index == 0
        assert h.settle() == 0  # the failed step's blocks are free too
    finally:
        h.close()


def closed_address() -> str:
    """A tcp address nothing listens on (a decode scaled down, or restarted elsewhere)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_h1_a_decode_that_went_away_never_blocks_a_prefill_and_is_forgotten(tiny_text_model):
    """H1: a prefill sent a keep-alive a second, blocking, to every decode it ever handed off
    to; ~1,000 queued to one that went away and the next send blocked the loop for good."""
    config = EngineConfig(model=str(tiny_text_model), dtype="float32", num_blocks=32)
    h = PrefillHarness(Engine.build(config), "prefill-h1")
    service, gone = h.service, closed_address()
    try:
        h.request("r", decode_kv_addr=gone)
        h.wait(P.TokenOutput, "r")  # token 0 out; its KV offered to a decode that is not there
        service.keepalives = Every(0)  # one a step: the ~1,000 of 17 minutes at once

        def housekeep() -> None:
            for _ in range(1500):
                service.housekeeping()

        loop = threading.Thread(target=housekeep, daemon=True)
        loop.start()
        loop.join(60)
        assert not loop.is_alive(), "the prefill blocked sending to a decode that went away"
        labels = {"service": "prefill-h1", "peer": "decode"}
        assert REGISTRY.get_sample_value("baton_sends_dropped_total", labels) > 0

        # silent for a lease: the request fails (retryable), and the decode is forgotten
        service.sender.lease_s = 0.1
        error = h.wait(P.RequestError, "r")
        assert error.retryable and "stopped answering" in error.message
        h.step_until(lambda: gone not in service.socks)
        assert gone not in service.sender.peers
        assert h.settle() == 0  # its KV blocks are free
    finally:
        h.close()


def test_h5_what_is_not_our_segment_in_the_shm_dir_is_left_alone_and_never_blocks(
    tmp_path, monkeypatch
):
    """H5: sweep() opened every /dev/shm/baton-kv-* blocking and caught too little: a FIFO of
    that name hung every service on the host, another user's segment crashed them."""
    monkeypatch.setattr(shm, "SHM_DIR", str(tmp_path))
    fifo = tmp_path / "baton-kv-1-fifo"
    os.mkfifo(fifo)
    (tmp_path / "baton-kv-1-dir").mkdir()
    (tmp_path / "baton-kv-1-link").symlink_to("/etc/hostname")
    others = tmp_path / "baton-kv-1-others"
    others.write_bytes(bytes(64))
    if os.geteuid() == 0:  # as root (CI), the file can belong to another user
        os.chown(others, 65534, 65534)
    gone = subprocess.Popen(["true"])  # a pid now gone: its segment is a dead owner's
    gone.wait()
    dead = tmp_path / f"baton-kv-{gone.pid}-dead"
    dead.write_bytes(bytes(64))

    removed: list[str] = []
    sweeper = threading.Thread(target=lambda: removed.extend(shm.sweep()), daemon=True)
    sweeper.start()
    sweeper.join(10)
    assert not sweeper.is_alive(), "sweep() blocked on a FIFO"
    assert removed == [str(dead)]
    assert all(p.exists() or p.is_symlink() for p in (fifo, others, tmp_path / "baton-kv-1-link"))
    pool = torch.zeros(1, 64, dtype=torch.uint8)
    for path in (fifo, tmp_path / "baton-kv-1-link", tmp_path / "baton-kv-1-dir"):
        with pytest.raises((OSError, ValueError)):  # a peer's Hello naming it is refused
            shm.ShmReader(P.ShmRegion(str(path), 64), pool)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_text_model):
    root = tmp_path_factory.mktemp("reliability")
    config = root / "baton.toml"
    config.write_text(f'[gateway]\nadmission = "queue-limit"\nmax_queued_requests = {MAX_QUEUED}\n')
    flags = ["--num-blocks", "640", "--write-timeout-s", "2", "--config", str(config)]
    s = Stack(root / "logs", tiny_text_model, *flags, prefill=0)  # 640: 8 x ~1,000 tokens
    yield s
    s.stop()


def send_raw(port: int, **body) -> socket.socket:
    """A completion request over a raw socket with a small receive buffer, never read."""
    data = json.dumps({"model": "", "prompt": [1, 5, 9, 13], "ignore_eos": True, **body}).encode()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", port))
    head = "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    client.sendall(f"{head}content-length: {len(data)}\r\n\r\n".encode() + data)
    return client


def wait_inflight(stack: Stack, busy: bool, why: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while (stack.metric("gateway", "baton_inflight_requests") > 0) != busy:
        assert time.monotonic() < deadline, why
        time.sleep(0.1)


def test_h4_a_client_that_stops_reading_is_dropped_and_its_request_ends(stack):
    """H4: a client that read the headers and then nothing held its admission slot (and its
    request ran on) for as long as it kept the connection open."""
    # ~12 MB of events: more than the socket buffers hold, so the gateway's writes stall
    client = send_raw(stack.port, max_tokens=1000, n=8, logprobs=20, stream=True)
    try:
        wait_inflight(stack, True, "the request never started")
        wait_inflight(stack, False, "the stalled client still holds its request")
        assert stack.wait_blocks_free(timeout=30) == {"decode-0": 0}
        r = stack.client().completions.create(model="", prompt=[1, 5, 9], max_tokens=4)
        assert r.choices[0].finish_reason == "length"
    finally:
        client.close()


def test_m2_a_non_streamed_request_ends_when_its_client_leaves(stack):
    """M2: a non-streamed answer ran to max_tokens after its client had gone."""
    left = stack.metric("gateway", "baton_requests_total", status="499")
    client = send_raw(stack.port, max_tokens=1000, n=8)
    wait_inflight(stack, True, "the request never started")
    client.close()
    wait_inflight(stack, False, "the request outlived its client")
    assert stack.metric("gateway", "baton_requests_total", status="499") == left + 1
    assert stack.wait_blocks_free(timeout=30) == {"decode-0": 0}


def _gone(pid: int, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/status") as f:
                if "zombie" in f.read():
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.2)
    return False


def test_l2_baton_up_stops_with_its_gateway_and_its_stack_dies_with_it(tmp_path, tiny_text_model):
    """L2: `baton up` ran on after its gateway died (a dead stack a supervisor sees alive),
    and a `baton up` killed -9 left its services running, ports and segments held."""
    first = Stack(tmp_path / "a", tiny_text_model, prefill=0)
    try:
        first.kill("gateway")
        first.proc.wait(30)
        assert first.proc.returncode != 0
        assert "the gateway exited" in (tmp_path / "a-up.log").read_text()
        assert _gone(first.pid("decode-0"))
    finally:
        first.stop()
    second = Stack(tmp_path / "b", tiny_text_model, prefill=0)
    try:
        second.proc.kill()  # -9: no chance to stop anything itself
        assert _gone(second.pid("gateway")) and _gone(second.pid("decode-0"))
    finally:
        second.stop()


def test_m3_a_burst_of_streams_is_admitted_only_up_to_the_limit(stack):
    """M3: admission counted a stream only once its response started, after the handler had
    returned, so a burst of streaming requests all saw the same count and all got in."""
    body = json.dumps(
        {"model": "", "prompt": [1, 5, 9], "max_tokens": 1000, "ignore_eos": True, "stream": True}
    ).encode()
    statuses: list[int] = []
    answered: list[float] = []  # when each got its status
    ended: list[float] = []  # when each admitted stream ended: an ended one frees its slot

    def one() -> None:
        req = urllib.request.Request(
            f"{stack.url}/v1/completions", body, {"content-type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                statuses.append(r.status)
                answered.append(time.monotonic())
                r.read()
                ended.append(time.monotonic())
        except urllib.error.HTTPError as e:
            statuses.append(e.code)
            answered.append(time.monotonic())

    threads = [threading.Thread(target=one) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(statuses) == 64 and set(statuses) == {200, 429}
    freed = sum(t < max(answered) for t in ended)  # slots that came free during the burst
    print(f"admitted {statuses.count(200)} of 64, {freed} ended during the burst")
    assert statuses.count(200) <= MAX_QUEUED + freed
    assert stack.wait_blocks_free(timeout=30) == {"decode-0": 0}


def baton(log: Path, *argv: str) -> subprocess.Popen:
    """One service started by hand, as a deployment does (`baton up` ends with its gateway)."""
    cmd = [sys.executable, "-P", "-m", "baton.cli", *argv]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)


def test_m11_a_restarted_gateway_aborts_what_its_predecessor_left_running(
    tmp_path, tiny_text_model
):
    """M11: a gateway that died left its requests running on the services to max_tokens, for
    nobody; the next gateway on the address aborts them at their first token it sees."""
    http, plane, probe = free_port(), free_port(), free_port()
    model = ["--model", str(tiny_text_model)]
    gateway = ["gateway", *model, "--port", str(http), "--zmq-addr", f"tcp://127.0.0.1:{plane}"]
    first = baton(tmp_path / "gateway-0.log", *gateway)
    decode = baton(tmp_path / "decode.log", "decode", *model, "--dtype", "float32",
                   "--gateway", f"tcp://127.0.0.1:{plane}", "--http-port", str(probe))  # fmt: skip
    url = f"http://127.0.0.1:{http}"

    def load(where: str) -> dict:
        try:
            code, body = get(f"{where}/health")
        except OSError:  # not listening (yet, or any more)
            return {}
        return json.loads(body) if code in (200, 503) else {}

    def wait(what, why: str) -> None:
        deadline = time.monotonic() + 120
        while not what():
            assert time.monotonic() < deadline, why
            time.sleep(0.2)

    def blocks_used() -> int:
        used = load(f"http://127.0.0.1:{probe}")["load"]
        return used["total_blocks"] - used["free_blocks"]

    clients: list[socket.socket] = []
    second = None
    try:
        wait(lambda: load(url).get("decode") == 1, "the decode never registered")
        for _ in range(16):  # 16 x 1,000 tokens: seconds at the least
            clients.append(send_raw(http, max_tokens=1000, stream=True))
        wait(lambda: blocks_used() > 0, "the requests never started")
        # the decode waits, frozen, until the next gateway listens: however long a gateway
        # takes to start, every request is still running when it does
        decode.send_signal(signal.SIGSTOP)
        first.kill()
        first.wait(10)
        second = baton(tmp_path / "gateway-1.log", *gateway)
        wait(lambda: load(url), "the second gateway never listened")
        decode.send_signal(signal.SIGCONT)
        wait(lambda: load(url).get("decode") == 1, "the decode never came back")
        wait(lambda: blocks_used() == 0, "the orphaned requests still run")
        _, body = get(f"{url}/metrics")
        aborted = re.search(r"^baton_orphans_aborted_total (\S+)$", body.decode(), re.M)
        assert aborted and float(aborted.group(1)) == 16
    finally:
        for c in clients:
            c.close()
        for proc in (first, decode, second):
            if proc is not None:
                proc.kill()
                proc.wait(10)


def test_l17_a_flood_of_malformed_messages_is_counted_and_seldom_logged(caplog):
    """L17: every malformed message logged a WARNING: a peer could fill the disk."""
    now = [0.0]
    throttled = ThrottledLog(logging.getLogger("baton.test"), period_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "baton.test"):
        for i in range(1000):
            now[0] = i / 1000  # a thousand in one second
            throttled.warning("dropped a malformed message: %s", i)
        assert [r.getMessage() for r in caplog.records] == ["dropped a malformed message: 0"]
        now[0] = 10.5
        throttled.warning("dropped a malformed message: %s", "late")
    assert caplog.records[-1].getMessage() == (
        "dropped a malformed message: late (and 999 more since the last)"
    )


def test_the_probe_closes_idle_connections_and_caps_how_many_it_holds():
    # slowloris: every connection that never sent a request held a thread, without limit (L5)
    port = free_port()
    server = serve_probe(port)
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(probe.MAX_CONNECTIONS)]
    try:
        extra = socket.create_connection(("127.0.0.1", port))
        idle.append(extra)
        for s in idle:
            s.settimeout(60)
        assert extra.recv(1) == b""  # every slot was taken: closed at once
        idle[0].setblocking(False)
        with pytest.raises(BlockingIOError):  # while the ones holding the slots are open
            idle[0].recv(1)
        idle[0].setblocking(True)
        assert all(s.recv(1) == b"" for s in idle[:-1])  # closed after TIMEOUT_S of silence
        assert get(f"http://127.0.0.1:{port}/health")[0] == 503  # "starting": it serves again
    finally:
        for s in idle:
            s.close()
        server.shutdown()
        server.server_close()


def test_slow_uploads_past_max_connections_get_a_503_not_memory(tmp_path, tiny_text_model):
    # each slow upload's body is held until it is whole: their number is capped (review L15)
    http = free_port()
    gateway = baton(tmp_path / "gateway.log", "gateway", "--model", str(tiny_text_model),
                    "--port", str(http), "--zmq-addr", f"tcp://127.0.0.1:{free_port()}",
                    "--max-connections", "4")  # fmt: skip
    url = f"http://127.0.0.1:{http}/v1/models"
    slow: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 120
        while True:  # up
            try:
                assert get(url)[0] == 200
                break
            except OSError:
                assert time.monotonic() < deadline and gateway.poll() is None, "no gateway"
                time.sleep(0.2)
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # four uploads that never finish hold the slots
            answered = select.select(slow, [], [], 0)[0]  # refused while the last probe's
            for s in answered:  # connection still counted: it holds nothing, replace it
                s.close()
                slow.remove(s)
            while len(slow) < 4:
                slow.append(socket.create_connection(("127.0.0.1", http)))
                slow[-1].sendall(head)
            if (code := get(url)[0]) == 503:
                break
            time.sleep(0.2)
        assert code == 503
        for s in slow:
            s.close()
        deadline = time.monotonic() + 60
        while (code := get(url)[0]) != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert code == 200  # the slots come back
    finally:
        for s in slow:
            s.close()
        gateway.terminate()
        gateway.wait(30)
