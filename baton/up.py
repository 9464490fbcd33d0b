"""`baton up`: a gateway and N prefill + M decode services as child processes of this one
(the CLI's own subcommands, so compose and Kubernetes run exactly what `up` runs), pinned to
CPUs, each with its own log; healthy, then watched until Ctrl-C or SIGTERM stops them all."""

import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import msgspec

from baton import plane
from baton.config import BatonConfig, to_toml
from baton.cpus import default_cpus, parse_cpus

PR_SET_PDEATHSIG = 1  # prctl(2)
DRAIN_KILL_S = 45.0  # a service drains for up to 30 s after SIGTERM (run_forever), then exits
START_S = 300.0  # an engine started by --autoscale registers within this, or is started again
RETRY_MAX_S = 60.0  # an engine that keeps dying before it registers: the longest wait between


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """The child processes of `baton up`, each with its own log file."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.manifest: dict[str, dict] = {}
        # the stack's socket files, where no other user can open them (0700)
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"baton-{os.getpid()}-"))

    def ipc_addr(self, name: str) -> str:
        """A zmq endpoint that is a file, not a port another process could take first, nor
        one another user could connect to; the files go when the stack stops."""
        return f"ipc://{self.run_dir / name}.sock"

    def spawn(self, name: str, argv: list[str], cpus: set[int] | None, **info) -> None:
        log = (self.log_dir / f"{name}.log").open("w")
        libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork

        def setup() -> None:  # in the child, before it runs
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # `baton up` killed: its stack goes too
            if cpus:
                os.sched_setaffinity(0, cpus)

        # -P: the working directory is not put on sys.path, so a checkout's top-level
        # folders (kernels/, gateway/, ...) shadow nothing, theirs or another package's
        cmd = [sys.executable, "-P", "-m", "baton.cli", *argv]
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=setup
        )
        log.close()  # the child has its own descriptor
        pid = self.procs[name].pid
        self.manifest[name] = {"pid": pid, "cpus": sorted(cpus or []), "argv": cmd, **info}
        # stack.json: who runs where and how (to restart one by hand), for operators and tests
        (self.log_dir / "stack.json").write_text(json.dumps(self.manifest, indent=1))

    def dead(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is not None]

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 10
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.run_dir, ignore_errors=True)


def up(config: BatonConfig, log_dir: Path, start_timeout: float) -> None:
    """`baton up`: start the stack, wait until it is healthy, then watch it until stopped."""
    from baton.model.files import resolve_model_dir

    print("preparing the model (the first run converts a GGUF once) ...", flush=True)
    model_dir = resolve_model_dir(config.engine.model)
    gw = config.gateway
    if config.key_dir and not (Path(config.key_dir) / "server.key").exists():
        print(f"service-plane keys made in {plane.generate(config.key_dir)}", flush=True)
    if scaler := Supervisor.of(config):
        config = scaler.configure(config)
    stack = Stack(log_dir)
    zmq_addr = gw.zmq_addr or stack.ipc_addr("gateway")
    config = msgspec.structs.replace(
        config,
        engine=msgspec.structs.replace(config.engine, model=str(model_dir)),
        gateway=msgspec.structs.replace(gw, zmq_addr=zmq_addr),
    )
    log_dir = stack.log_dir
    # every child reads the one effective config, so no setting is passed twice
    config_file = log_dir / "config.toml"
    # it may hold the API key: readable by this user only (reliability review M9)
    config_file.unlink(missing_ok=True)
    with os.fdopen(os.open(config_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(to_toml(config, redact=False))  # the gateway reads its key from it
    url = f"http://{gw.host}:{gw.port}"
    stack.spawn("gateway", ["gateway", "--config", str(config_file)], None, role="gateway", url=url)
    launch = Launcher(stack, config, config_file, zmq_addr)
    counts = {"prefill": config.prefill.count, "decode": config.decode.count}
    if scaler:
        counts = scaler.start(launch)
    else:
        aggregated = config.prefill.count == 0
        for role, count in counts.items():
            cpus = getattr(config, role).cpus
            cpus = parse_cpus(cpus if cpus is not None else default_cpus(role, aggregated))
            for _ in range(count):
                launch(role, cpus)

    def shutdown(*_):
        print("stopping ...", flush=True)
        stack.stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    deadline = time.monotonic() + start_timeout
    while not healthy(url, counts):
        if dead := stack.dead():
            stack.stop()
            sys.exit(f"{', '.join(dead)} exited during start-up; see {log_dir}/")
        if time.monotonic() > deadline:
            stack.stop()
            sys.exit(f"the stack was not healthy after {start_timeout}s; see {log_dir}/")
        time.sleep(0.3)
    print(
        f"Baton is up: {counts['prefill']} prefill + {counts['decode']} decode, "
        f"model {model_dir.name}",
        flush=True,
    )
    print(f"  OpenAI API: {url}/v1   (logs and config.toml in {log_dir}/)", flush=True)
    while True:
        time.sleep(1)
        if "gateway" in (dead := stack.dead()):  # nothing serves without it: say so, loudly
            stack.stop()
            sys.exit(f"the gateway exited: the stack is stopped; see {log_dir}/")
        if dead:  # a service: its streams fail over, the pool serves on
            if failed := [n for n in dead if scaler is None or n not in scaler.draining]:
                print(f"warning: {', '.join(failed)} exited; see {log_dir}/", flush=True)
            for name in dead:
                stack.procs.pop(name)
        if scaler:
            scaler.act(status(url), launch)


def status(url: str) -> dict:
    """The gateway's /health body (a 503's too: not healthy, but it says why); {} while it
    does not answer, or answers something else."""
    try:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read())
    except (OSError, ValueError, http.client.HTTPException):
        return {}
    return body if isinstance(body, dict) else {}


def healthy(url: str, pools: dict[str, int]) -> bool:
    """The gateway is healthy and every service of `pools` has registered."""
    body = status(url)
    return bool(body.get("healthy")) and all(body.get(role) == n for role, n in pools.items())


class Launcher:
    """Starts a prefill or decode service of the stack on `cpus`, with an id of its own."""

    def __init__(self, stack: Stack, config: BatonConfig, config_file: Path, zmq_addr: str):
        self.stack, self.config = stack, config
        self.config_file, self.zmq_addr = config_file, zmq_addr
        self.started = {"prefill": 0, "decode": 0}

    def __call__(self, role: str, cpus: set[int] | None) -> str:
        config, stack = self.config, self.stack
        name = f"{role}-{self.started[role]}"
        self.started[role] += 1
        threads = config.engine.threads or (len(cpus) if cpus else None)
        port = free_port()
        argv = [role, "--config", str(self.config_file), "--id", name]
        argv += ["--gateway", self.zmq_addr, "--http-port", str(port)]
        if threads:
            argv += ["--threads", str(threads)]
        if role == "decode":
            # one host: a socket file in the 0700 run directory, but where the KV itself is to
            # cross TCP (transport zmq-tcp: its test and benchmark)
            kv_addr = stack.ipc_addr(f"{name}-kv")
            if config.transport == "zmq-tcp":
                kv_addr = "tcp://127.0.0.1:*"  # the port is chosen at bind: no race
            argv += ["--kv-addr", kv_addr]
        if config.key_dir:  # its own key: a leaked one speaks for this service alone
            plane.issue(config.key_dir, role, name)
        stack.spawn(name, argv, cpus, role=role, url=f"http://127.0.0.1:{port}")
        return name


class Supervisor:
    """`baton up --autoscale`: the CPUs, in `max_services` equal shares, split between one
    prefill engine and one decode engine as the gateway's autoscaler wants (its /health
    `desired`, in shares), or one decode engine on them all while it wants no prefill. A move
    starts the engines of the new split beside the old ones (sharing their cores meanwhile)
    and, once the gateway lists them, drains the old (SIGTERM: each finishes what it holds and
    takes nothing new; killed if it has not left DRAIN_KILL_S later), so no pool is ever empty.
    An engine of the split in effect that dies, or does not register within START_S, is
    started again."""

    def __init__(
        self, shares: list[set[int]], prefill: int, clock: Callable[[], float] = time.monotonic
    ):
        self.shares, self.prefill, self.clock = shares, prefill, clock  # the split wanted
        self.target = self.layout()  # the split in effect (or being moved to)
        self.running: dict[str, tuple[str, frozenset[int]]] = {}  # name -> (role, cores)
        self.starting: dict[str, float] = {}  # running, not listed by the gateway yet: since
        self.draining: dict[str, float] = {}  # name -> when it was told to drain
        # an engine that died before registering: how often, and when it may start again
        self.failures: dict[tuple[str, frozenset[int]], int] = {}
        self.retry_at: dict[tuple[str, frozenset[int]], float] = {}

    @classmethod
    def of(cls, config: BatonConfig) -> "Supervisor | None":
        total = config.autoscale.max_services
        if not total:
            return None
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            sys.exit("--autoscale moves CPUs between the pools: it needs 2 CPUs or more")
        if not 2 <= total <= len(cpus):
            sys.exit(f"--max-services {total}: 2 to {len(cpus)} shares of the {len(cpus)} CPUs")
        if config.prefill.count >= total:
            sys.exit(f"--prefill {config.prefill.count} leaves no share of {total} to decode")
        if config.engine.threads:
            sys.exit("--autoscale gives each engine a thread per core: unset [engine] threads")
        k = len(cpus) // total  # equal shares: what is left over (len % total) stays idle
        return cls([set(cpus[i * k : (i + 1) * k]) for i in range(total)], config.prefill.count)

    def configure(self, config: BatonConfig) -> BatonConfig:
        """The config with the shares' size, for the gateway's autoscaler."""
        autoscale = msgspec.structs.replace(config.autoscale, share_cores=len(self.shares[0]))
        return msgspec.structs.replace(config, autoscale=autoscale)

    def layout(self) -> list[tuple[str, frozenset[int]]]:
        """The engines of the split wanted: (role, cores)."""
        p = self.prefill
        engines = [("decode", frozenset().union(*self.shares[p:]))]
        if p:
            engines.insert(0, ("prefill", frozenset().union(*self.shares[:p])))
        return engines

    def start(self, launch: Launcher) -> dict[str, int]:
        """The engines of the configured split; how many of each role there are."""
        for role, cores in self.target:
            self.running[launch(role, set(cores))] = (role, cores)
        return {"prefill": int(self.prefill > 0), "decode": 1}

    def act(self, health: dict, launch: Launcher) -> None:
        """One step toward the split the gateway wants: start what it lacks, wait until the
        gateway lists them, then drain what it does not want."""
        procs, now = launch.stack.procs, self.clock()
        for name in [n for n in self.running if n not in procs]:  # exited: started again below
            engine = self.running.pop(name)
            if self.starting.pop(name, None) is not None:  # before it registered: back off
                self.failures[engine] = failures = self.failures.get(engine, 0) + 1
                self.retry_at[engine] = now + min(2.0**failures, RETRY_MAX_S)
        for name, since in list(self.starting.items()):
            if now - since > START_S:  # never registered: ended, and started again
                procs[name].kill()
        for name, since in list(self.draining.items()):
            if name not in procs:
                del self.draining[name]
            elif now - since > DRAIN_KILL_S:
                procs[name].kill()
        desired = health.get("desired")
        prefill = desired.get("prefill") if isinstance(desired, dict) else None
        if isinstance(prefill, int) and 0 <= prefill < len(self.shares):
            self.prefill = prefill  # else the gateway's last word stands
        listed = set(health.get("services", ()))
        for name in [n for n in self.starting if n in listed]:
            del self.starting[name]
            self.failures.pop(self.running[name], None)
        if not self.starting and not self.draining and self.layout() != self.target:
            self.target = self.layout()
            print(
                f"autoscale: moving to {self.prefill} of {len(self.shares)} shares on prefill",
                flush=True,
            )
        for role, cores in [e for e in self.target if e not in self.running.values()]:
            if now < self.retry_at.get((role, cores), 0.0):
                continue
            name = launch(role, set(cores))  # a new split's, or one that died
            self.running[name], self.starting[name] = (role, cores), now
            print(f"autoscale: {name} starting on CPUs {sorted(cores)}", flush=True)
        if self.starting or any(e not in self.running.values() for e in self.target):
            return  # the old engines serve until every new one is in
        for name in [n for n, engine in self.running.items() if engine not in self.target]:
            print(f"autoscale: {name} drains", flush=True)
            del self.running[name]
            self.draining[name] = now
            procs[name].terminate()
