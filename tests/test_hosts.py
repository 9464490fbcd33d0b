"""Services on separate hosts: each in its own network, UTS and mount namespaces (its own
address on a private bridge, its own host name, /etc/hosts and /dev/shm), started with the
compose file's own command lines, as containers would run them. Needs root (CI is)."""

import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import yaml
from reference import hf_greedy

from baton.bench.hosts import Hosts

COMPOSE = Path(__file__).parent.parent / "compose"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("unshare")),
    reason="separate hosts need root, ip and unshare",
)

NEW = 400  # tokens a stream generates: enough to be cut off mid-stream
# every token as transformers' greedy output has it: by id, and past an end-of-text
EXACT = {"return_token_ids": True, "ignore_eos": True}


def compose_command(service: str, keys: Path, model: Path) -> list[str]:
    """The compose file's command for a service, as its container runs it (the config and the
    key volume where this test keeps them); an engine in fp32 for the exact comparison, with
    a small pool (each host's /dev/shm holds its own)."""
    argv = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())["services"][service]
    argv = [{"/keys": str(keys)}.get(a, a) for a in argv["command"]]
    argv[argv.index("--config") + 1] = str(COMPOSE / "baton.toml")
    engine = ["--dtype", "float32", "--num-blocks", "256"] if service != "gateway" else []
    return [sys.executable, "-P", "-m", "baton.cli", *argv, "--model", str(model), *engine]


def wait_for(what, timeout: float, why: str, every_s: float = 0.3):
    deadline = time.monotonic() + timeout
    while not (got := what()):
        assert time.monotonic() < deadline, why
        time.sleep(every_s)
    return got


def pools(url: str) -> dict:
    try:
        with openai.DefaultHttpxClient(timeout=2) as http:
            return http.get(f"{url}/health").json()
    except Exception:  # not listening yet
        return {}


@pytest.fixture
def keys(tmp_path) -> Path:
    subprocess.run([sys.executable, "-P", "-m", "baton.cli", "keys", str(tmp_path / "keys")],
                   check=True)  # fmt: skip
    return tmp_path / "keys"


def test_a_stack_on_four_hosts_is_exact_and_survives_a_decode_cut_off(
    tmp_path, tiny_text_model, keys
):
    seed = 2026_12_08
    print("seed", seed)
    rng = random.Random(seed)
    hosts = Hosts(tmp_path, ["gateway", "prefill-0", "decode-0", "decode-1"])
    try:
        for name in hosts.hosts:
            hosts.run(name, compose_command(name.split("-")[0], keys, tiny_text_model))
        url = f"http://{hosts.hosts['gateway']}:8000"
        healthy = {"healthy": True, "prefill": 1, "decode": 2}
        wait_for(lambda: pools(url) == healthy, 180, f"pools never registered: {pools(url)}")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        prompts = [
            [rng.randrange(3, 49152) for _ in range(rng.randrange(20, 90))] for _ in range(4)
        ]
        expected = hf_greedy(tiny_text_model, prompts, NEW)
        for ids, want in zip(prompts, expected, strict=True):
            c = client.completions.create(
                model=tiny_text_model.name,
                prompt=ids,
                max_tokens=24,
                temperature=0,
                extra_body=EXACT,
            )
            assert c.choices[0].token_ids == want[:24]
        # the KV moved between hosts over NIXL or TCP; shared memory was tried and was not there
        logs = hosts.log("decode-0") + hosts.log("decode-1")
        chosen = re.findall(r"KV over (\S+) \(skipped shm: (.*?)\)$", logs, re.M)
        assert chosen, logs
        for transport, why_not_shm in chosen:
            assert transport in ("nixl", "zmq-tcp")
            assert why_not_shm == "the prefill's segment is not here (another host)"

        # each KV hand-off landed: none timed out and was prefilled again on its decode
        assert metric(url, "baton_migrations_total") == 0

        got: list[list[int]] = [[] for _ in prompts]
        errors: list[BaseException] = []

        def stream(i: int) -> None:
            try:
                for chunk in client.completions.create(
                    model=tiny_text_model.name, prompt=prompts[i], max_tokens=NEW, temperature=0, stream=True,
                    extra_body=EXACT,
                ):  # fmt: skip
                    got[i] += chunk.choices[0].token_ids
            except BaseException as e:  # the assertion below names it
                errors.append(e)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        wait_for(lambda: all(len(g) >= 4 for g in got), 60, f"no start: {got}", every_s=0.01)
        # the decode running the most of them drops off the network: its streams resume on
        # the other one
        cut = max(("decode-0", "decode-1"), key=lambda d: running(hosts.hosts[d]))
        cut_at = time.monotonic()
        hosts.cut(cut)
        for t in threads:
            t.join(120)  # the deadline: a stream that hangs fails here
        assert not any(t.is_alive() for t in threads), "a stream hung after the cut"
        print(f"every stream done {time.monotonic() - cut_at:.1f} s after the cut")
        assert not errors and got == expected
        migrations = metric(url, "baton_migrations_total")
        print(f"streams resumed elsewhere: {migrations:.0f}")
        assert migrations >= 1
    finally:
        hosts.close()


def running(ip: str) -> int:
    """Sequences in a decode's batch, from its probe (/health on port 9000)."""
    with openai.DefaultHttpxClient(timeout=5) as http:
        return http.get(f"http://{ip}:9000/health").json()["load"]["running"]


def metric(url: str, name: str) -> float:
    with openai.DefaultHttpxClient(timeout=5) as http:
        body = http.get(f"{url}/metrics").text
    m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", body, re.M)
    return float(m.group(1)) if m else 0.0


def test_a_decode_that_would_advertise_a_loopback_address_to_other_hosts_refuses_to_start(
    tmp_path, tiny_text_model, keys
):
    # its host name resolves to Debian's 127.0.1.1 (review L4); another binds 127.0.0.1 while
    # its gateway is on another host: no prefill there could reach either
    hosts = Hosts(tmp_path, ["gateway", "decode-0", "decode-1"], resolve={"decode-0": "127.0.1.1"})
    try:
        wildcard = hosts.run("decode-0", compose_command("decode", keys, tiny_text_model))
        loop = compose_command("decode", keys, tiny_text_model)
        loop[loop.index("tcp://0.0.0.0:6000")] = "tcp://127.0.0.1:6000"
        local = hosts.run("decode-1", loop)
        assert wildcard.wait(120) != 0 and local.wait(120) != 0
        assert "resolves to 127.0.1.1, a loopback address" in hosts.log("decode-0")
        assert "tcp://127.0.0.1:6000 is a loopback address, but the gateway" in hosts.log(
            "decode-1"
        )
    finally:
        hosts.close()
