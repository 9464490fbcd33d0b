"""`baton k8s render`: plain Kubernetes manifests for a config, the compose stack's shape.

One gateway (it holds the streams and the pools' registry: one replica, replaced, never two
at once), prefill and decode Deployments that scale independently, each pod converting the
model into its own cache first (an init container running `baton prepare`, as compose's
`model` service does). The service plane's CURVE keys travel as one Secret per role, each
with only what that role needs (a prefill's pod cannot speak as a decode); API keys as a
Secret the config names by path, never in the ConfigMap. Services find the gateway through
a headless Service that lists it before it is ready (its readiness is "the pools have
registered", which needs the plane first). A NetworkPolicy lets only the stack's own pods in,
but for the API and probe ports (NIXL's data path is not keyed). Pools scale on
`baton_desired_replicas{pool}`: an HPA on that external metric, or a KEDA ScaledObject
querying Prometheus for it.
"""

import argparse
import base64
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import msgspec

from baton import plane
from baton.config import BatonConfig, to_toml

CONFIG_DIR, KEY_DIR, API_KEYS = "/etc/baton", "/keys", "/etc/baton/api-keys/api-keys"
PORTS = {"http": 8000, "plane": 5555, "probe": 9000, "kv": 6000}
DRAIN_S = 30  # a service finishes what it holds this long after SIGTERM (run_forever)
UID = 1000  # the image's user (compose/Dockerfile.cpu)


@dataclass
class Options:
    name: str = "baton"
    namespace: str | None = None
    image: str = "baton-serve:cpu"
    prefill: int = 1
    decode: int = 1
    max_replicas: int = 8
    autoscaler: str = "hpa"  # or keda
    prometheus: str = "http://prometheus-operated.monitoring.svc:9090"  # KEDA's query target
    cpu: str = "2"
    memory: str = "8Gi"
    gpus: int = 0  # per prefill/decode pod: nvidia.com/gpu


def render(config: BatonConfig, keys: Path, opts: Options) -> list[dict]:
    """Every object, in the order `kubectl apply` wants them (what others refer to first)."""
    api_keys = api_keys_of(config)
    gateway = msgspec.structs.replace(
        config.gateway, api_key=None, api_key_file=API_KEYS if api_keys else None
    )
    served = msgspec.structs.replace(config, gateway=gateway)
    if opts.prefill == 0:  # aggregated at first: the gateway is ready without a prefill pool
        prefill = msgspec.structs.replace(config.prefill, count=0)
        served = msgspec.structs.replace(served, prefill=prefill)
    k = Kube(opts, bool(api_keys))
    objects = [
        k.obj("v1", "ConfigMap", "config", data={"baton.toml": config_toml(served)}),
        *(
            k.secret(f"keys-{role}", {f: (keys / f).read_text() for f in key_files(role)})
            for role in plane.ROLES
        ),
    ]
    if api_keys:
        objects.append(k.secret("api-keys", {"api-keys": "\n".join(api_keys) + "\n"}))
    objects += [
        k.gateway(),
        k.service("gateway", "gateway", ["http"]),
        # the plane: services register before the gateway is ready (its readiness needs them)
        k.service("plane", "gateway", ["plane"], headless=True, not_ready=True),
        k.service("metrics", None, ["probe"], headless=True),  # every pod, for the scraper
        k.pool("prefill", opts.prefill),
        k.pool("decode", opts.decode),
        *(k.budget(role) for role in ("prefill", "decode")),
        k.monitor(),
        k.network_policy(),
        *(k.autoscaler(role) for role in ("prefill", "decode")),
    ]
    return [o for o in objects if o is not None]


def api_keys_of(config: BatonConfig) -> list[str]:
    keys = [config.gateway.api_key] if config.gateway.api_key else []
    if config.gateway.api_key_file:
        keys += Path(config.gateway.api_key_file).read_text().split()
    return keys


def config_toml(config: BatonConfig) -> str:
    return to_toml(config, redact=False)  # no secret is left in it: the API keys moved


def key_files(role: str) -> list[str]:
    """A role's files in a key directory: the server's public key for everyone; its secret
    key and the clients' public keys for those that bind a socket (the gateway, a decode's KV
    socket); the role's own pool key for those that connect."""
    files = ["server.key"]
    if role in ("gateway", "decode"):
        files += ["server.key_secret", *(f"clients/{r}.key" for r in plane.ROLES)]
    if role != "gateway":
        files.append(f"{role}.key_secret")
    return files


class Kube:
    """Objects named `<name>-<part>`, labelled with the app and their component."""

    def __init__(self, opts: Options, api_keys: bool):
        self.opts, self.has_api_keys = opts, api_keys

    def labels(self, component: str | None) -> dict[str, str]:
        app = {"app.kubernetes.io/name": self.opts.name}
        return app | ({"app.kubernetes.io/component": component} if component else {})

    def obj(self, api: str, kind: str, part: str, component: str | None = None, **body) -> dict:
        meta = {"name": f"{self.opts.name}-{part}", "labels": self.labels(component or part)}
        if self.opts.namespace:
            meta["namespace"] = self.opts.namespace
        return {"apiVersion": api, "kind": kind, "metadata": meta, **body}

    def secret(self, part: str, files: dict[str, str]) -> dict:
        # a Secret's keys cannot hold "/": clients/x.key is stored as clients.x.key
        data = {
            f.replace("/", "."): base64.b64encode(v.encode()).decode() for f, v in files.items()
        }
        return self.obj("v1", "Secret", part, type="Opaque", data=data)

    def service(
        self,
        part: str,
        select: str | None,  # the component whose pods it selects; None: every pod of the app
        ports: list[str],
        headless: bool = False,
        not_ready: bool = False,
    ) -> dict:
        spec = {
            "selector": self.labels(select),
            "ports": [{"name": p, "port": PORTS[p], "targetPort": p} for p in ports],
        }
        if headless:
            spec["clusterIP"] = "None"
        if not_ready:
            spec["publishNotReadyAddresses"] = True
        return self.obj("v1", "Service", part, select, spec=spec)

    def container(self, role: str, args: list[str], ports: list[str]) -> dict:
        o = self.opts
        resources = {"requests": {"cpu": o.cpu, "memory": o.memory}, "limits": {"memory": o.memory}}
        if o.gpus and role != "gateway":
            resources["limits"]["nvidia.com/gpu"] = o.gpus
        health = {"httpGet": {"path": "/health", "port": "probe"}, "periodSeconds": 10}
        if role == "gateway":  # up at once; ready once the pools have registered
            alive = {"tcpSocket": {"port": "http"}, "periodSeconds": 10}
            probes = {"startupProbe": alive | {"failureThreshold": 30},
                      "readinessProbe": health, "livenessProbe": alive}  # fmt: skip
        else:  # /health: 503 while the model loads, 200 serving, 503 when the loop stalls
            probes = {"startupProbe": health | {"failureThreshold": 60},  # 10 min to load
                      "readinessProbe": health, "livenessProbe": health}  # fmt: skip
        return {
            "name": role,
            "image": o.image,
            "args": [role, "--config", f"{CONFIG_DIR}/baton.toml", "--key-dir", KEY_DIR,
                     "--http-host", "0.0.0.0", "--http-port", str(PORTS["probe"]), *args],
            "ports": [{"name": p, "containerPort": PORTS[p]} for p in ports],
            "resources": resources,
            **probes,
            "volumeMounts": self.mounts(role),
            "securityContext": {"allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]}},
        }  # fmt: skip

    def mounts(self, role: str) -> list[dict]:
        mounts = [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "models", "mountPath": "/models"},
        ]
        if role in plane.ROLES:  # not the init container: it only converts the model
            mounts.append({"name": "keys", "mountPath": KEY_DIR, "readOnly": True})
        if role == "gateway" and self.has_api_keys:
            mounts.append({"name": "api-keys", "mountPath": str(Path(API_KEYS).parent),
                           "readOnly": True})  # fmt: skip
        return mounts

    def pod(self, role: str, container: dict) -> dict:
        n = self.opts.name
        volumes = [
            {"name": "config", "configMap": {"name": f"{n}-config"}},
            {"name": "keys", "secret": {"secretName": f"{n}-keys-{role}", "defaultMode": 0o440,
                                         "items": [{"key": f.replace("/", "."), "path": f}
                                                   for f in key_files(role)]}},
            {"name": "models", "emptyDir": {}},
        ]  # fmt: skip
        if role == "gateway" and self.has_api_keys:
            volumes.append({"name": "api-keys", "secret": {"secretName": f"{n}-api-keys",
                                                           "defaultMode": 0o440}})  # fmt: skip
        # the engines' pods build the kernels here, not as they start
        kernels = ["--kernels"] if role != "gateway" else []
        prepare = {
            "name": "prepare-model",
            "image": self.opts.image,
            "args": ["prepare", "--config", f"{CONFIG_DIR}/baton.toml", *kernels],
            "volumeMounts": self.mounts("prepare"),
            "securityContext": container["securityContext"],
        }
        return {
            "metadata": {"labels": self.labels(role)},
            "spec": {
                "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "fsGroup": UID},
                "initContainers": [prepare],
                "containers": [container],
                "volumes": volumes,
                # SIGTERM drains: heartbeats say so, what is in flight finishes
                "terminationGracePeriodSeconds": DRAIN_S + 15,
            },
        }

    def deployment(self, role: str, replicas: int, container: dict, **spec) -> dict:
        body = {"replicas": replicas, "selector": {"matchLabels": self.labels(role)},
                "template": self.pod(role, container), **spec}  # fmt: skip
        return self.obj("apps/v1", "Deployment", role, spec=body)

    def gateway(self) -> dict:
        args = ["--host", "0.0.0.0", "--port", str(PORTS["http"]),
                "--zmq-addr", f"tcp://0.0.0.0:{PORTS['plane']}"]  # fmt: skip
        c = self.container("gateway", args, ["http", "plane", "probe"])
        return self.deployment("gateway", 1, c, strategy={"type": "Recreate"})

    def pool(self, role: str, replicas: int) -> dict:
        args = ["--gateway", f"tcp://{self.opts.name}-plane:{PORTS['plane']}"]
        ports = ["probe"]
        if role == "decode":  # advertised as the pod's own address (its /etc/hosts)
            args += ["--kv-addr", f"tcp://0.0.0.0:{PORTS['kv']}"]
            ports.append("kv")
        return self.deployment(role, replicas, self.container(role, args, ports))

    def budget(self, role: str) -> dict:
        spec = {"maxUnavailable": 1, "selector": {"matchLabels": self.labels(role)}}
        return self.obj("policy/v1", "PodDisruptionBudget", role, spec=spec)

    def network_policy(self) -> dict:
        """Into the stack's pods: anything from its own pods (the plane is keyed, but NIXL's
        data path is not, and UCX picks its ports), the API port from anywhere, the probe
        port from anywhere (kubelets, Prometheus); nothing else."""
        ours = {"podSelector": {"matchLabels": self.labels(None)}}
        anyone = [{"namespaceSelector": {}}, {"ipBlock": {"cidr": "0.0.0.0/0"}}]
        ingress = [
            {"from": [ours]},
            {"from": anyone, "ports": [{"port": "http", "protocol": "TCP"}]},
            {"from": anyone, "ports": [{"port": "probe", "protocol": "TCP"}]},
        ]
        spec = {"podSelector": ours["podSelector"], "policyTypes": ["Ingress"], "ingress": ingress}
        return self.obj("networking.k8s.io/v1", "NetworkPolicy", "internal", spec=spec)

    def monitor(self) -> dict:
        spec = {
            "selector": {"matchLabels": self.labels("metrics")},
            "endpoints": [{"port": "probe", "path": "/metrics", "interval": "15s"}],
        }
        return self.obj("monitoring.coreos.com/v1", "ServiceMonitor", "metrics", spec=spec)

    def autoscaler(self, role: str) -> dict | None:
        """A pool's HPA or KEDA ScaledObject. An aggregated stack (`--prefill 0`) may gain a
        prefill pool when the gateway wants one (gateway/autoscale.py): KEDA scales it from
        zero; an HPA cannot (without the HPAScaleToZero feature gate), so none is written."""
        o, target = self.opts, {"apiVersion": "apps/v1", "kind": "Deployment",
                                "name": f"{self.opts.name}-{role}"}  # fmt: skip
        least = 0 if role == "prefill" and o.prefill == 0 else 1
        if o.autoscaler == "keda":
            query = f'max(baton_desired_replicas{{pool="{role}"}})'
            trigger = {"type": "prometheus", "metadata": {
                "serverAddress": o.prometheus, "query": query, "threshold": "1"}}  # fmt: skip
            spec = {"scaleTargetRef": {"name": target["name"]}, "minReplicaCount": least,
                    "maxReplicaCount": o.max_replicas, "triggers": [trigger]}  # fmt: skip
            return self.obj("keda.sh/v1alpha1", "ScaledObject", role, spec=spec)
        if least == 0:
            return None
        # the metric is the replica count wanted: an average of 1 per pod scales to it
        metric = {"type": "External", "external": {
            "metric": {"name": "baton_desired_replicas",
                       "selector": {"matchLabels": {"pool": role}}},
            "target": {"type": "AverageValue", "averageValue": "1"}}}  # fmt: skip
        spec = {"scaleTargetRef": target, "minReplicas": 1, "maxReplicas": o.max_replicas,
                "metrics": [metric]}  # fmt: skip
        return self.obj("autoscaling/v2", "HorizontalPodAutoscaler", role, spec=spec)


def add_parser(sub) -> None:
    from baton.cli import add_config_args

    k8s = sub.add_parser("k8s", help="Kubernetes manifests")
    p = k8s.add_subparsers(dest="action", required=True).add_parser(
        "render", help="write the stack's manifests for a config (YAML, to stdout or --out)"
    )
    add_config_args(p, {})
    d = Options()
    p.add_argument("--image", default=d.image)
    p.add_argument("--name", default=d.name, help="prefix of every object's name")
    p.add_argument("--namespace", default=None)
    p.add_argument("--prefill", type=int, default=d.prefill, help="replicas at first")
    p.add_argument("--decode", type=int, default=d.decode, help="replicas at first")
    p.add_argument("--max-replicas", type=int, default=d.max_replicas, help="per pool")
    p.add_argument("--autoscaler", choices=("hpa", "keda"), default=d.autoscaler)
    p.add_argument("--prometheus", default=d.prometheus, help="KEDA's Prometheus")
    p.add_argument("--cpu", default=d.cpu, help="CPU request per pod")
    p.add_argument("--memory", default=d.memory, help="memory per pod")
    p.add_argument("--gpus", type=int, default=d.gpus, help="GPUs per prefill/decode pod")
    p.add_argument("--key-dir", help="the plane's keys (`baton keys`); unset: new ones")
    p.add_argument("--out", help="a file instead of stdout")
    p.set_defaults(func=cmd_render)


def cmd_render(args: argparse.Namespace) -> None:
    import yaml

    from baton.cli import config_from

    config = config_from(args)
    fields = {f: getattr(args, f) for f in Options.__dataclass_fields__}
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(args.key_dir) if args.key_dir else plane.generate(Path(tmp) / "keys")
        objects = render(config, keys, Options(**fields))

    class Dumper(yaml.SafeDumper):  # the config as the TOML file it is, not one long line
        def represent_str(self, text: str):
            style = "|" if "\n" in text else None
            return self.represent_scalar("tag:yaml.org,2002:str", text, style=style)

    Dumper.add_representer(str, Dumper.represent_str)
    Dumper.ignore_aliases = lambda self, data: True  # each object whole, no &anchors
    text = yaml.dump_all(objects, Dumper=Dumper, sort_keys=False)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
