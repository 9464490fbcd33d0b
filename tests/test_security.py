"""Security basics at the HTTP edge: the API key on every route but /health (and the probe
port, which serves /health and /metrics to an internal scraper), and every size a client
controls capped with a clear OpenAI-style 4xx. The real gateway app runs in process
with no services behind it: each check here answers before a request would reach one. Plus:
no pickle anywhere near a socket. (Loopback binding is checked on a live stack in
test_fuzz.py.)"""

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from baton.config import load_config
from baton.gateway.app import create_app
from baton.gateway.limits import MAX_BODY_BYTES
from baton.probe import serve_probe

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONTEXT = 64
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def probe():
    server = serve_probe(0)  # a free port
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def client(tiny_text_model, probe):
    overrides = {"gateway.api_key": KEY, "gateway.zmq_addr": "tcp://127.0.0.1:*",
                 "engine.max_model_len": CONTEXT}  # fmt: skip
    with TestClient(create_app(tiny_text_model, load_config(None, overrides), probe)) as c:
        yield c


def error(r, status: int, match: str) -> None:
    """An OpenAI-style error with this status, whose message matches."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and re.search(match, err["message"]), err


def test_api_key_guards_every_route_but_health(client):
    paths = {r.path for r in client.app.routes if "{" not in r.path}
    assert {"/docs", "/openapi.json", "/metrics", "/v1/models", "/v1/completions"} <= paths
    for path in paths - {"/health"}:
        post = any(isinstance(r, APIRoute) and "POST" in r.methods and r.path == path
                   for r in client.app.routes)  # fmt: skip
        call = client.post if post else client.get
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            error(call(path, headers=headers), 401, "API key")
        assert call(path, headers=AUTH).status_code != 401, path
    assert client.get("/health").status_code == 503  # open; no services behind it


def test_the_probe_port_serves_metrics_and_health_without_the_key(client, probe):
    # for a scraper on an internal network (compose's Prometheus): the API port's /metrics
    # wants the key, which the scraper would otherwise need (reliability review L16)
    error(client.get("/metrics"), 401, "API key")
    url = f"http://127.0.0.1:{probe.server_address[1]}"
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        assert r.status == 200 and b'baton_services{role="decode"} 0.0' in r.read()
    with pytest.raises(urllib.error.HTTPError) as e:  # 503: no services behind it
        urllib.request.urlopen(f"{url}/health", timeout=10)
    assert json.loads(e.value.read()) == {"healthy": False, "prefill": 0, "decode": 0}


def test_body_over_the_cap_is_413(client):
    body = json.dumps({"prompt": "x" * MAX_BODY_BYTES}).encode()
    r = client.post("/v1/completions", content=body, headers=AUTH)
    error(r, 413, f"over {MAX_BODY_BYTES} bytes")
    # no Content-Length to trust: the body is counted as it streams in
    chunks = (body[i : i + (1 << 20)] for i in range(0, len(body), 1 << 20))
    r = client.post("/v1/completions", content=chunks, headers=AUTH)
    error(r, 413, f"over {MAX_BODY_BYTES} bytes")


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"prompt": [5] * CONTEXT}, f"prompt has {CONTEXT} tokens; this model's context is {CONTEXT}"),
        ({"prompt": "hi", "max_tokens": CONTEXT + 1}, f"max_tokens is {CONTEXT + 1}; .* is {CONTEXT}"),
        ({"prompt": "hi", "max_tokens": 10**30}, "max_tokens is"),
        ({"prompt": "hi", "n": 9}, r"^n is 9; at most 8"),
        ({"prompt": [-1, 5]}, r"prompt token ids must be in \[0, \d+\)"),
        ({"prompt": [[5], [10**12]]}, r"prompt token ids must be in \[0, \d+\)"),
        ({"prompt": [True]}, "^prompt"),
        ({"prompt": "hi", "seed": 2**64}, "^seed: Input should be less than or equal"),
        ({"prompt": "hi", "stop_token_ids": [-(2**70)]}, "^stop_token_ids.0: Input should be"),
        ({"prompt": ""}, "the prompt is empty"),
        ({"prompt": "hi", "stop": ["x"] * 17}, "^stop: at most 16 strings"),
        ({"prompt": "hi", "stop": "y" * 257}, "of at most 256 characters"),
        ({"prompt": "hi", "stop_token_ids": [5] * 257}, "^stop_token_ids: .*at most 256"),
        # refused before the tokenizer spends seconds on it: no 1,025 characters fit 64 tokens
        ({"prompt": "x" * (CONTEXT * 16 + 1)}, f"^prompt has {CONTEXT * 16 + 1} characters"),
        ({"prompt": ["hi", "x" * 10**6]}, "^prompt has 1000000 characters; at most 1024"),
        # more prompts than are ever served at once: never servable, so not a 429 (L6)
        ({"prompt": [[5]] * 257}, r"^257 prompts in one request; at most 256 are served at once"),
    ],
)  # fmt: skip
def test_sizes_a_client_controls_are_capped_with_400(client, body, match):
    error(client.post("/v1/completions", json=body, headers=AUTH), 400, match)


def test_a_priority_is_a_400_unless_the_operator_allows_it(client):
    """Reliability review M8: any client could jump every queue and preempt the others."""
    r = client.post("/v1/completions", json={"prompt": "hi", "priority": -(2**63)}, headers=AUTH)
    error(r, 400, r"^priority is not enabled on this server \(\[gateway\] allow_priority\)")
    assert r.json()["error"]["param"] == "priority"


def test_an_infinite_temperature_is_a_400(client):
    body = b'{"prompt": "hi", "temperature": 1e999}'  # json.loads reads it as inf
    headers = {**AUTH, "content-type": "application/json"}
    error(
        client.post("/v1/completions", content=body, headers=headers), 400, "^temperature: .*finite"
    )


def test_a_chat_too_long_to_fit_is_refused_before_it_is_tokenized(client):
    body = {"messages": [{"role": "user", "content": "hi " * 4000}]}
    r = client.post("/v1/chat/completions", json=body, headers=AUTH)
    error(r, 400, "^messages has 12000 characters; at most 1024")
    assert r.json()["error"]["param"] == "messages"


def test_chat_max_completion_tokens_is_capped_too(client):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10**6}
    r = client.post("/v1/chat/completions", json=body, headers=AUTH)
    error(r, 400, f"max_tokens is 1000000; this model's context is {CONTEXT}")


def test_stream_with_no_service_left_ends_in_an_error_event(client):
    """With no decode to place it on, a request is refused before it starts: 503, and a
    stream's client, which reads events, gets it as one error event, as it would if the pool
    emptied mid-response."""
    body = {"prompt": "hi", "max_tokens": 4}
    error(client.post("/v1/completions", json=body, headers=AUTH), 503, "no decode service")
    r = client.post("/v1/completions", json={**body, "stream": True}, headers=AUTH)
    assert r.status_code == 200
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert events == [
        {"error": {"message": "no decode service is available",
                   "type": "service_unavailable", "param": None, "code": 503}}
    ]  # fmt: skip


def test_unknown_routes_answer_in_the_openai_error_shape(client):
    error(client.get("/v1/nothing", headers=AUTH), 404, "Not Found")
    error(client.get("/v1/completions", headers=AUTH), 405, "Method Not Allowed")


def test_nothing_near_a_socket_imports_pickle():
    """Every socket carries msgspec Structs; unpickling a peer's bytes would run its code."""
    pattern = re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|marshal)\b", re.M)
    packages = ("baton", "gateway", "prefill", "decode", "kvtransfer")
    offenders = [
        str(f.relative_to(ROOT))
        for p in packages
        for f in (ROOT / p).rglob("*.py")
        if pattern.search(f.read_text())
    ]
    assert not offenders
