"""Fuzz and bad input against a live tiny-model stack: schemathesis over the gateway's OpenAPI
schema, then malformed, truncated and out-of-protocol ZeroMQ messages sent straight to the
gateway's ROUTER, a decode's KV socket and a prefill's gateway link. Each service must log,
drop, and keep serving: the same greedy tokens afterwards, and every KV block back."""

import time
import uuid
from collections.abc import Callable

import httpx
import msgspec
import psutil
import pytest
import schemathesis
import zmq
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prefill_harness import PrefillHarness
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from stack import Stack

from baton import protocol as P
from baton.config import EngineConfig, load_config
from baton.engine import Engine
from baton.request import FinishReason
from baton.sampling_params import SamplingParams

# a 64-token context bounds every generation the fuzzers ask for
ENGINE = ("--transport", "zmq-tcp", "--num-blocks", "64", "--max-model-len", "64")
PROMPT = "The quick brown fox"
encode = msgspec.msgpack.encode
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_text_model):
    s = Stack(tmp_path_factory.mktemp("fuzz") / "logs", tiny_text_model, *ENGINE)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(stack) -> list[int]:
    """Greedy tokens before any fuzzing: what the stack must still give after it."""
    return greedy(stack.url)


def greedy(url: str) -> list[int]:
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}  # fmt: skip
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def assert_still_serving(stack: Stack, reference: list[int]) -> None:
    assert greedy(stack.url) == reference, stack.logs()
    assert set(stack.blocks_used()) == {"prefill-0", "decode-0"}, "a service died"
    assert not any(stack.wait_blocks_free().values()), stack.logs()


def metric(url: str, name: str, **labels: str) -> float:
    body = httpx.get(f"{url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name == name and labels.items() <= s.labels.items():
                return s.value
    return 0.0


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


def listening(pid: int) -> set[tuple[str, int]]:
    """(ip, port) of every TCP socket the process listens on."""
    conns = psutil.Process(pid).net_connections("inet")
    return {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}


def truncated(msgs: st.SearchStrategy) -> st.SearchStrategy[bytes]:
    """A valid message cut short anywhere: never decodable."""
    raw = msgs.map(encode)
    return raw.flatmap(lambda b: st.integers(0, len(b) - 1).map(lambda n: b[:n]))


# --- HTTP: schemathesis ------------------------------------------------------------------


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


# schemathesis' own pytest loader (`from_fixture`) breaks on pytest 9, so its cases are drawn
# here with plain hypothesis: schema-valid ones, then schema-invalid ones
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzed_http_requests_get_no_5xx(stack, reference, mode):
    schema = schemathesis.openapi.from_url(f"{stack.url}/openapi.json")

    # the same 150 cases every run: CI stays reproducible (a random run, e.g. with
    # `derandomize=False`, is how new cases are found)
    @settings(FUZZ, max_examples=150, derandomize=True)
    @given(case=schema.as_strategy(mode))
    def call(case):
        case.call_and_validate(checks=CHECKS, timeout=30)

    call()


def test_success_bodies_have_a_schema_for_the_fuzzer_to_check(stack):
    """response_schema_conformance checks a 200 body only against a schema the route declares:
    without one every success would pass unchecked."""
    paths = httpx.get(f"{stack.url}/openapi.json", timeout=5).json()["paths"]
    routes = [("/v1/completions", "post"), ("/v1/chat/completions", "post"), ("/v1/models", "get")]
    for path, method in routes:
        content = paths[path][method]["responses"]["200"]["content"]
        assert content["application/json"]["schema"]["$ref"], path


def test_still_serving_after_http_fuzz(stack, reference):
    assert_still_serving(stack, reference)


# --- the gateway's ROUTER, as a broken service --------------------------------------------

stray_tokens = st.builds(
    P.TokenOutput,
    req_id=st.text(max_size=8),
    index=st.integers(-(2**63), 2**63 - 1),
    token_id=st.integers(-(2**63), 2**63 - 1),
    finish_reason=st.sampled_from([None, *FinishReason]),
)
stray_errors = st.builds(P.RequestError, st.text(max_size=8), st.text(max_size=16))
# messages as (frames, is_bad): bad ones count in baton_gateway_bad_messages; the rest are valid
# messages for requests nobody made, tokens out of order included, and are dropped quietly
to_gateway = st.one_of(
    st.binary(max_size=64).map(lambda b: [([b], True)]),
    truncated(st.one_of(stray_tokens, stray_errors)).map(lambda b: [([b], True)]),
    st.lists(st.binary(max_size=16), min_size=2, max_size=4).map(lambda fs: [(fs, True)]),
    st.one_of(stray_tokens, stray_errors).map(lambda m: [([encode(m)], False)]),
    st.permutations(range(4)).map(
        lambda order: [([encode(P.TokenOutput("gone", i, 5))], False) for i in order]
    ),
)


def test_gateway_router_drops_garbage_and_stray_tokens(stack, reference):
    zmq_addr = load_config(stack.log_dir / "config.toml").gateway.zmq_addr
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(zmq_addr)
    bad_before = metric(stack.url, "baton_gateway_bad_messages_total")
    num_bad = 0

    @settings(FUZZ, max_examples=80)
    @given(st.lists(to_gateway, max_size=4))
    @example([[([b"two", b"frames"], True)]])
    def send(batches):
        nonlocal num_bad
        for frames, is_bad in (m for batch in batches for m in batch):
            sock.send_multipart(frames)
            num_bad += is_bad

    try:
        send()
        want = bad_before + num_bad
        assert wait_for(lambda: metric(stack.url, "baton_gateway_bad_messages_total") == want)
        assert_still_serving(stack, reference)
    finally:
        ctx.destroy(linger=0)


# --- a decode's KV socket, as a broken prefill --------------------------------------------


class FakePrefill:
    """A DEALER on a decode's KV socket that follows the protocol only as far as it likes."""

    def __init__(self, ctx: zmq.Context, addr: str, name: str):
        self.name = name
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, name.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(addr)
        self.codec = P.Codec(P.DecodeToPrefill)

    def send(self, msg, *frames: bytes) -> None:
        self.sock.send_multipart([self.codec.encode(msg), *frames])

    def reply(self, timeout_s: float = 10):
        """The decode's next message within `timeout_s` (None: none came), answering its
        keep-alives on the way (so it keeps us)."""
        deadline = time.monotonic() + timeout_s
        while self.sock.poll(max(0.0, deadline - time.monotonic()) * 1000):
            msg = self.codec.decode(self.sock.recv())
            if not isinstance(msg, P.KeepAlive):
                return msg
            self.send(P.KeepAlive())
        return None
        raise TimeoutError(f"the decode did not answer {self.name}")


@st.composite
def offers(draw, vocab_size: int, block_size: int, num_blocks: int) -> P.KVOffer:
    """A consistent offer (so the pull path runs), or one with a field broken."""
    n = draw(st.integers(1, 40))
    token_ids = draw(st.lists(st.integers(0, vocab_size - 1), min_size=n + 1, max_size=n + 1))
    num_computed, num_prompt = n, n
    block_ids = list(range(-(-n // block_size)))
    params = SamplingParams(
        max_tokens=draw(st.integers(1, 4)), temperature=draw(st.sampled_from([0.0, 1.0]))
    )
    broken = draw(st.sampled_from([None, "tokens", "computed", "prompt", "blocks"]))
    if broken == "tokens":
        i = draw(st.integers(0, n))
        token_ids[i] = draw(st.sampled_from([-1, vocab_size, 2**63 - 1]))
    elif broken == "computed":
        num_computed = draw(st.sampled_from([-1, 0, n + 1, n + 100]))
    elif broken == "prompt":
        num_prompt = draw(st.sampled_from([-5, 0, n + 1, n + 50]))
    elif broken == "blocks":
        block_ids = draw(st.lists(st.integers(-3, num_blocks + 3), max_size=5))
    req_id = f"fuzz-{uuid.uuid4().hex[:8]}"
    return P.KVOffer(req_id, token_ids, num_prompt, num_computed, params, block_ids)


kv_garbage = st.one_of(
    st.lists(st.binary(max_size=48), min_size=1, max_size=3),
    truncated(st.builds(P.KVAbort, st.text(max_size=8), st.text(max_size=8))).map(lambda b: [b]),
    st.just([encode(P.KVRelease("not-a-prefill-message"))]),
)


def answers(block_nbytes: int) -> st.SearchStrategy:
    """What the fake prefill does once the decode asks for the bytes (KVPull): abort; offer
    the same request again, then send the right frames; or send frames of these sizes (None:
    the right ones) filled with this byte (0xff: every float is NaN)."""
    sizes = st.lists(
        st.one_of(st.integers(0, 3).map(lambda n: n * block_nbytes), st.integers(1, 3000)),
        max_size=3,
    )
    fills = st.sampled_from([0x00, 0x3C, 0xFF])
    return st.one_of(
        st.just(("abort", None, 0)),
        st.just(("offer again", None, 0)),
        st.tuples(st.just("frames"), st.none(), fills),
        st.tuples(st.just("frames"), sizes, fills),
    )


def test_decode_kv_socket_drops_garbage_and_bad_hand_offs(stack, reference):
    config = load_config(stack.log_dir / "config.toml").engine_for("decode")
    engine = Engine.build(config)  # only for what the decode must agree on
    layout, num_blocks = engine.layout(), engine.kv_manager.pool.num_blocks
    vocab_size = engine.model.args.vocab_size
    (decode,) = stack.services("decode").values()
    probe_port = int(decode["url"].rsplit(":", 1)[1])
    (kv_port,) = {port for _, port in listening(decode["pid"])} - {probe_port}
    kv_addr = f"tcp://127.0.0.1:{kv_port}"
    bad_before = metric(decode["url"], "baton_bad_messages_total", service="decode-0")
    num_bad = 0
    ctx = zmq.Context()
    try:
        # an offer before Hello: say Hello first; a layout that differs: refused
        stranger = FakePrefill(ctx, kv_addr, "fuzz-stranger")
        offer = P.KVOffer("fuzz-early", [5, 6], 1, 1, SamplingParams(), [0])
        stranger.send(offer)
        assert stranger.reply() == P.Rehello("fuzz-early")
        stranger.send(P.Hello("fuzz-stranger", P.KVLayout("x", "f", 1, 1, 1, 1, 1), 8, "zmq-tcp"))
        assert stranger.reply().ok is False
        stranger.send(offer)
        assert isinstance(stranger.reply(), P.KVAbort)

        peer = FakePrefill(ctx, kv_addr, "fuzz-prefill")
        peer.send(P.Hello("fuzz-prefill", layout, num_blocks, "zmq-tcp"))
        assert peer.reply() == P.HelloReply(True, "", "zmq-tcp")
        block_nbytes = layout.block_nbytes

        def variant(**fields) -> P.KVOffer:
            """A consistent offer of 20 computed tokens, with `fields` changed."""
            req_id = f"fuzz-{uuid.uuid4().hex[:8]}"
            good = P.KVOffer(req_id, [5] * 21, 20, 20, SamplingParams(max_tokens=3), [0, 1])
            return msgspec.structs.replace(good, **fields)

        @settings(FUZZ, max_examples=60)
        @given(
            garbage=st.lists(kv_garbage, max_size=3),
            offer=offers(vocab_size, layout.block_size, num_blocks),
            answer=answers(block_nbytes),
        )
        # the cases that once crashed or leaked, every run
        @example(garbage=[], offer=variant(), answer=("frames", [block_nbytes + 1], 0))
        @example(garbage=[], offer=variant(), answer=("offer again", None, 0))
        @example(garbage=[], offer=variant(token_ids=[vocab_size] * 21), answer=("abort", None, 0))
        @example(garbage=[], offer=variant(num_computed=21), answer=("frames", None, 0))
        @example(garbage=[], offer=variant(num_computed=-1, block_ids=[]), answer=("frames", [], 0))
        @example(garbage=[], offer=variant(params=SamplingParams()), answer=("frames", None, 0xFF))
        def hand_off(garbage, offer, answer):
            nonlocal num_bad
            for frames in garbage:
                peer.sock.send_multipart(frames)
                num_bad += 1
            peer.sock.send(encode(P.KVBlocks("never-offered", [(0, 1)])))
            peer.send(offer)
            reply = peer.reply()
            if isinstance(reply, P.KVPull):
                action, sizes, fill = answer
                if action == "offer again":  # dropped: the first one stays pulled
                    peer.send(offer)
                    num_bad += 1
                if action == "abort":
                    peer.send(P.KVAbort(offer.req_id, "fuzz"))
                else:
                    sizes = [block_nbytes] * len(offer.block_ids) if sizes is None else sizes
                    frames = [bytes([fill]) * n for n in sizes]
                    peer.send(P.KVBlocks(offer.req_id, [(0, len(frames))]), *frames)
                reply = peer.reply()
            # taken, failed or refused: the decode lets go of the prefill's blocks every time
            assert isinstance(reply, P.KVRelease) and reply.req_id == offer.req_id, reply

        hand_off()
        bad = metric(decode["url"], "baton_bad_messages_total", service="decode-0")
        assert bad == bad_before + num_bad
        assert_still_serving(stack, reference)
    finally:
        ctx.destroy(linger=0)


def test_decode_reads_a_streamed_prompt_as_offered_into_blocks_reserved_whole(stack, reference):
    """Streaming from the decode's side, with the test as the prefill: each offer's new blocks
    are pulled as they come, into blocks reserved for the whole prompt at the first one (half
    reservations could deadlock two streamed prompts), and one release follows the last."""
    config = load_config(stack.log_dir / "config.toml").engine_for("decode")
    layout = Engine.build(config).layout()
    (decode,) = stack.services("decode").values()
    probe_port = int(decode["url"].rsplit(":", 1)[1])
    (kv_port,) = {port for _, port in listening(decode["pid"])} - {probe_port}
    ctx = zmq.Context()
    try:
        peer = FakePrefill(ctx, f"tcp://127.0.0.1:{kv_port}", "stream-prefill")
        peer.send(P.Hello("stream-prefill", layout, 64, "zmq-tcp"))
        assert peer.reply().ok
        # tokens no other test sends: a block the decode caches already would not be pulled
        prompt, params, nbytes = (
            list(range(600, 640)),
            SamplingParams(max_tokens=2),
            layout.block_nbytes,
        )
        peer.send(P.KVOffer("streamed", prompt, 40, 16, params, [7], final=False))
        assert peer.reply() == P.KVPull("streamed", [7])
        peer.send(P.KVBlocks("streamed", [(7, 1)]), bytes(nbytes))
        assert wait_for(lambda: stack.blocks_used()["decode-0"] == 3)  # 40 tokens: 3 blocks
        peer.send(P.KVOffer("streamed", [*prompt, 9], 40, 40, params, [7, 8, 3], final=True))
        assert peer.reply() == P.KVPull("streamed", [8, 3])  # only what is new
        peer.send(P.KVBlocks("streamed", [(8, 1), (3, 1)]), bytes(nbytes), bytes(nbytes))
        assert peer.reply() == P.KVRelease("streamed", 3 * nbytes)
        assert_still_serving(stack, reference)
    finally:
        ctx.destroy(linger=0)


def test_every_service_listens_on_loopback_only(stack):
    for name, service in stack.services().items():
        addrs = listening(service["pid"])
        assert addrs and {ip for ip, _ in addrs} <= {"127.0.0.1", "::1"}, (name, addrs)


# --- a prefill's gateway link, as a broken gateway (in process: only a gateway reaches it) ---


def test_prefill_gateway_link_drops_garbage_and_fails_bad_requests(tiny_text_model):
    config = EngineConfig(model=str(tiny_text_model), dtype="float32", num_blocks=32,
                          max_model_len=64)  # fmt: skip
    engine = Engine.build(config)
    vocab_size = engine.model.args.vocab_size
    h = PrefillHarness(engine, "prefill-fuzz")
    garbage = st.one_of(
        st.lists(st.binary(max_size=48), min_size=1, max_size=3),  # one bad message a frame
        truncated(st.builds(P.Abort, st.text(max_size=8))).map(lambda b: [b]),
    )
    bad_fields = st.one_of(
        st.just({"token_ids": []}),
        st.builds(dict, token_ids=st.lists(st.sampled_from([-1, vocab_size]), min_size=1)),
        st.just({"token_ids": [5] * 64}),  # the whole context: no room for a new token
        # ("" is no decode at all: the prefill keeps the request and decodes it itself)
        st.builds(dict, decode_kv_addr=st.sampled_from(["nowhere", "tcp://", "udp://a:1"])),
    )
    num_bad = 0

    @settings(FUZZ, max_examples=30)
    @given(garbage=st.lists(garbage, max_size=3), fields=bad_fields)
    @example(garbage=[], fields={"decode_kv_addr": "nowhere"})
    @example(garbage=[], fields={"token_ids": [vocab_size]})
    def feed(garbage, fields):
        nonlocal num_bad
        for frames in garbage:
            h.send(*frames)
            num_bad += len(frames)  # the link reads frame by frame
        h.send(h.up.encode(P.Abort("nobody")))
        req_id = uuid.uuid4().hex
        h.request(req_id, **fields)
        assert h.wait(P.RequestError, req_id)

    try:
        h.request("before")
        before = h.wait(P.TokenOutput, "before")
        feed()
        h.request("after")
        assert h.wait(P.TokenOutput, "after").token_id == before.token_id
        assert h.settle() == 0
        bad = REGISTRY.get_sample_value("baton_bad_messages_total", {"service": "prefill-fuzz"})
        assert bad == num_bad + h.num_bad_sent
    finally:
        h.close()
