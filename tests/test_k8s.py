"""`baton k8s render`: every object valid against Kubernetes' schemas (kubernetes-validate),
and wired: selectors, ports, probes and names agree; each container's arguments parse with
the real CLI and load the config its ConfigMap holds; each role's Secret makes a key
directory the service plane loads, holding only what the role needs."""

import base64
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from functools import partial
from pathlib import Path

import httpx
import kubernetes_validate
import openai
import pytest
import yaml
import zmq

from baton import plane
from baton.bench.hosts import Hosts
from baton.cli import config_from, parser
from baton.gateway import metrics as M
from baton.k8s import API_KEYS, PORTS

ROOT = Path(__file__).parent.parent
K8S_VERSION = "1.37.0"
CRDS = {"ServiceMonitor", "ScaledObject"}  # not Kubernetes' own: no schema to check them by


def render(tmp_path: Path, *args: str) -> list[dict]:
    out = tmp_path / "baton.yaml"
    cmd = [sys.executable, "-P", "-m", "baton.cli", "k8s", "render", "--out", str(out), *args]
    subprocess.run(cmd, check=True)
    return list(yaml.safe_load_all(out.read_text()))


@pytest.fixture
def api_config(tmp_path) -> Path:
    """compose's config with an API key in it and more in a file."""
    (tmp_path / "tenants").write_text("tenant-a-key\ntenant-b-key\n")
    config = tmp_path / "baton.toml"
    config.write_text(
        (ROOT / "compose/baton.toml")
        .read_text()
        .replace(
            "[gateway]\n", f'[gateway]\napi_key = "sk-main"\napi_key_file = "{tmp_path}/tenants"\n'
        )
    )
    return config


@pytest.fixture
def objects(tmp_path, api_config) -> dict[tuple[str, str], dict]:
    rendered = render(tmp_path, "--config", str(api_config), "--namespace", "llm", "--gpus", "1")
    return {(o["kind"], o["metadata"]["name"]): o for o in rendered}


def test_every_object_is_valid_kubernetes(objects):
    for (kind, _), o in objects.items():
        assert o["metadata"]["namespace"] == "llm"
        if kind in CRDS:
            continue
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)  # raises, naming the field
    kinds = sorted({kind for kind, _ in objects})
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy",
                     "PodDisruptionBudget", "Secret", "Service", "ServiceMonitor"]  # fmt: skip


def pods(objects) -> dict[str, dict]:
    return {n: o["spec"]["template"] for (k, n), o in objects.items() if k == "Deployment"}


def selected(objects, selector: dict) -> set[str]:
    return {
        n for n, t in pods(objects).items() if selector.items() <= t["metadata"]["labels"].items()
    }


def test_services_select_their_pods_on_ports_those_pods_open(objects):
    assert selected(objects, objects["Service", "baton-gateway"]["spec"]["selector"]) == {
        "baton-gateway"
    }
    plane_service = objects["Service", "baton-plane"]["spec"]
    # services register before the gateway is ready: its readiness waits for them
    assert selected(objects, plane_service["selector"]) == {"baton-gateway"}
    assert plane_service["clusterIP"] == "None" and plane_service["publishNotReadyAddresses"]
    metrics = objects["Service", "baton-metrics"]
    assert selected(objects, metrics["spec"]["selector"]) == set(pods(objects))
    for (kind, name), o in objects.items():
        if kind == "Service":
            for target in selected(objects, o["spec"]["selector"]):
                (c,) = pods(objects)[target]["spec"]["containers"]
                opened = {p["name"] for p in c["ports"]}
                assert {p["targetPort"] for p in o["spec"]["ports"]} <= opened, (name, target)
        if kind == "Deployment":
            labels = o["spec"]["template"]["metadata"]["labels"]
            assert o["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # the pods take anything from each other (NIXL's data path is not keyed), from others
    # only the API and the probes
    policy = objects["NetworkPolicy", "baton-internal"]["spec"]
    assert selected(objects, policy["podSelector"]["matchLabels"]) == set(pods(objects))
    own, *open_ports = policy["ingress"]
    assert own == {"from": [{"podSelector": policy["podSelector"]}]}
    assert [r["ports"] for r in open_ports] == [[{"port": p, "protocol": "TCP"}]
                                                 for p in ("http", "probe")]  # fmt: skip
    monitor = objects["ServiceMonitor", "baton-metrics"]["spec"]
    assert monitor["selector"]["matchLabels"] == metrics["metadata"]["labels"]
    assert [e["port"] for e in monitor["endpoints"]] == ["probe"]


def materialize(objects, pod: dict, root: Path) -> dict[str, Path]:
    """Each volume of a pod written out as the kubelet mounts it: mount path -> directory."""
    (c,) = pod["spec"]["containers"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    out = {}
    for m in c["volumeMounts"]:
        v, d = volumes[m["name"]], root / m["name"]
        d.mkdir(parents=True, exist_ok=True)
        if "configMap" in v:
            for key, text in objects["ConfigMap", v["configMap"]["name"]]["data"].items():
                (d / key).write_text(text)
        elif "secret" in v:
            data = objects["Secret", v["secret"]["secretName"]]["data"]
            for item in v["secret"].get("items") or [{"key": k, "path": k} for k in data]:
                (d / item["path"]).parent.mkdir(parents=True, exist_ok=True)
                (d / item["path"]).write_bytes(base64.b64decode(data[item["key"]]))
        out[m["mountPath"]] = d
    return out


def test_each_container_runs_the_cli_on_the_config_and_keys_it_mounts(objects, tmp_path):
    plane_addr = "tcp://baton-plane:5555"
    for name, pod in pods(objects).items():
        role = name.removeprefix("baton-")
        (c,) = pod["spec"]["containers"]
        mounts = materialize(objects, pod, tmp_path / role)
        args = parser().parse_args(c["args"])
        assert args.command == role
        # the config file and the key directory the arguments name are mounted there
        args.config = str(mounts[str(Path(args.config).parent)] / Path(args.config).name)
        config = config_from(args)
        assert config.slo.ttft_ms == 2000 and config.engine.dtype == "bfloat16"
        keys = plane.Keys(mounts[args.key_dir])
        files = {str(p.relative_to(mounts[args.key_dir])) for p in mounts[args.key_dir].rglob("*")}
        if role == "gateway":
            # API keys: in a Secret the config names by path, never in the ConfigMap
            assert config.gateway.api_key is None
            path = Path(config.gateway.api_key_file)
            tenants = (mounts[str(path.parent)] / path.name).read_text().split()
            assert tenants == ["sk-main", "tenant-a-key", "tenant-b-key"]
            assert "prefill.key_secret" not in files and "decode.key_secret" not in files
            assert "sk-main" not in str(objects["ConfigMap", "baton-config"])
            assert config.gateway.zmq_addr == "tcp://0.0.0.0:5555"
            assert (config.gateway.host, config.gateway.port) == ("0.0.0.0", 8000)
        else:
            assert args.gateway == plane_addr
            with zmq.Context.instance().socket(zmq.DEALER) as sock:
                keys.connect_as(sock, role, name)  # its pool key, loaded
            assert f"{role}.key_secret" in files
            # a prefill's pod cannot bind as the server nor speak as a decode
            others = {f"{r}.key_secret" for r in plane.ROLES} - {f"{role}.key_secret"}
            assert not files & others
            assert ("server.key_secret" in files) == (role == "decode")
            assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert pod["spec"]["terminationGracePeriodSeconds"] > 30  # the drain's length
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            port = next(iter(c[probe].values()))["port"]
            assert port in {p["name"] for p in c["ports"]}
        # the model is converted into the pod's own cache before it starts (and an engine's
        # kernels built there, not as it starts)
        (init,) = pod["spec"]["initContainers"]
        prepare = parser().parse_args(init["args"])
        assert prepare.command == "prepare" and prepare.kernels == (role != "gateway")
    # the address the pools register at is the plane Service's
    host, port = plane_addr.removeprefix("tcp://").split(":")
    assert [p["port"] for p in objects["Service", host]["spec"]["ports"]] == [int(port)]


def test_pools_scale_on_the_desired_replicas_metric_by_hpa_or_keda(objects, tmp_path):
    for role in ("prefill", "decode"):
        hpa = objects["HorizontalPodAutoscaler", f"baton-{role}"]["spec"]
        assert ("Deployment", hpa["scaleTargetRef"]["name"]) in objects
        (metric,) = hpa["metrics"]
        assert metric["external"]["metric"] == {
            "name": "baton_desired_replicas", "selector": {"matchLabels": {"pool": role}}
        }  # fmt: skip
        budget = objects["PodDisruptionBudget", f"baton-{role}"]["spec"]
        assert selected(objects, budget["selector"]["matchLabels"]) == {f"baton-{role}"}
    # what the gateway exports (tests/test_autoscale.py: what it decides)
    assert M.DESIRED_REPLICAS.describe()[0].name == "baton_desired_replicas"
    keda = render(tmp_path, "--autoscaler", "keda")
    assert "HorizontalPodAutoscaler" not in {o["kind"] for o in keda}
    scaled = [o["spec"] for o in keda if o["kind"] == "ScaledObject"]
    assert [s["scaleTargetRef"]["name"] for s in scaled] == ["baton-prefill", "baton-decode"]
    for s, role in zip(scaled, ("prefill", "decode"), strict=True):
        (trigger,) = s["triggers"]
        assert trigger["metadata"]["query"] == f'max(baton_desired_replicas{{pool="{role}"}})'
        assert s["minReplicaCount"] == 1
    # aggregated at first (no prefill pool): KEDA may bring one up from zero, an HPA cannot
    keda = render(tmp_path, "--autoscaler", "keda", "--prefill", "0")
    assert [(o["spec"]["minReplicaCount"], o["metadata"]["name"]) for o in keda
            if o["kind"] == "ScaledObject"] == [(0, "baton-prefill"), (1, "baton-decode")]  # fmt: skip
    split = tmp_path / "split.toml"  # a config that names a prefill pool
    split.write_text("[prefill]\ncount = 1\n")
    aggregated = render(tmp_path, "--config", str(split), "--prefill", "0")
    hpas = [o["metadata"]["name"] for o in aggregated if o["kind"] == "HorizontalPodAutoscaler"]
    assert hpas == ["baton-decode"]
    # and the gateway is told so: ready with no prefill registered (whatever the config said)
    (config,) = [o["data"]["baton.toml"] for o in aggregated if o["kind"] == "ConfigMap"]
    assert tomllib.loads(config)["prefill"]["count"] == 0


@pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("unshare")),
    reason="pods on hosts of their own need root, ip and unshare",
)
def test_the_rendered_pods_serve_when_run_as_a_kubelet_would(objects, tmp_path):
    """Each Deployment's pod on a host of its own (baton.bench.hosts), its volumes written out
    from the ConfigMap and Secrets, the Services' names resolving to the gateway's pod: the
    API answers only the Secret's keys, a prompt's KV moves between the pods under their
    role keys, and every pod's probe port answers."""
    pod_of = {name: f"{name}-0" for name in pods(objects)}  # host name = pod name
    gateway_pod = pod_of["baton-gateway"]
    services = {"baton-plane": gateway_pod, "baton-gateway": gateway_pod}
    (tmp_path / "net").mkdir()
    hosts = Hosts(tmp_path / "net", list(pod_of.values()), resolve=services)
    env = ["env", f"BATON_CACHE={tmp_path / 'models'}"]  # one cache: each pod's would be its own
    try:
        for name, pod in pods(objects).items():
            mounts = materialize(objects, pod, tmp_path / name)
            at = partial(written_at, mounts)
            config = mounts["/etc/baton"] / "baton.toml"
            config.write_text(config.read_text().replace(API_KEYS, at(API_KEYS)))
            (c,) = pod["spec"]["containers"]
            (init,) = pod["spec"]["initContainers"]
            baton = [*env, sys.executable, "-P", "-m", "baton.cli"]
            subprocess.run([*baton, *map(at, init["args"])], check=True, capture_output=True)
            hosts.run(pod_of[name], [*baton, *map(at, c["args"])])
        gateway = hosts.hosts[gateway_pod]
        probe = f"http://{gateway}:{PORTS['probe']}/health"
        ready = lambda: get_status(probe) == 200  # noqa: E731  pools registered
        deadline = time.monotonic() + 240
        while not ready():
            assert time.monotonic() < deadline, hosts.log(gateway_pod)
            time.sleep(0.5)
        api = f"http://{gateway}:{PORTS['http']}/v1"
        client = openai.OpenAI(base_url=api, api_key="tenant-b-key", max_retries=0)
        model = client.models.list().data[0].id
        words = " ".join(["tell me about the sea"] * 100)  # long enough to be handed off
        chat = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": words}], max_tokens=8
        )
        assert chat.choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=api, api_key="sk-wrong", max_retries=0).models.list()
        prefill = hosts.hosts[pod_of["baton-prefill"]]
        for name, ip in hosts.hosts.items():
            assert get_status(f"http://{ip}:{PORTS['probe']}/health") == 200, name
        metrics = httpx.get(f"http://{prefill}:{PORTS['probe']}/metrics").text
        assert re.search(r"^baton_kv_transfers_total\{[^}]*\} [1-9]", metrics, re.M), metrics
    finally:
        hosts.close()


def written_at(mounts: dict[str, Path], path: str) -> str:
    """A path in the pod, where this test wrote the volume mounted there."""
    mount = max((m for m in mounts if path.startswith(m)), key=len, default=None)
    return path if mount is None else str(mounts[mount]) + path[len(mount) :]


def get_status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0
