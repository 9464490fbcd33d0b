"""`baton up | gateway | prefill | decode`: one CLI for every way of starting Baton.

`baton up` starts a gateway and N prefill + M decode services as child processes of this
one (the same subcommands, so compose and Kubernetes run exactly what `up` runs), pins them to
CPUs, waits until the stack is healthy, and stops everything on Ctrl-C or SIGTERM.
"""

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import msgspec

from baton.config import EngineConfig

ENGINE_FLAGS = {  # flag -> EngineConfig field; each overrides the --config file
    "--model": "model",
    "--dtype": "dtype",
    "--block-size": "block_size",
    "--num-blocks": "num_blocks",
    "--kv-cache-gib": "kv_cache_gib",
    "--max-num-seqs": "max_num_seqs",
    "--max-num-batched-tokens": "max_num_batched_tokens",
    "--max-chunk-tokens": "max_chunk_tokens",
    "--max-model-len": "max_model_len",
    "--threads": "threads",
}
FIELD_TYPES = {"model": str, "dtype": str, "kv_cache_gib": float}


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file; its [engine] table fills EngineConfig")
    for flag, name in ENGINE_FLAGS.items():
        p.add_argument(flag, dest=name, type=FIELD_TYPES.get(name, int), default=None)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    table = {}
    if args.config:
        table = tomllib.loads(Path(args.config).read_text()).get("engine", {})
    table.update(
        {n: getattr(args, n) for n in ENGINE_FLAGS.values() if getattr(args, n) is not None}
    )
    try:
        return msgspec.convert(table, EngineConfig)
    except (msgspec.ValidationError, ValueError) as e:
        raise SystemExit(f"bad engine config: {e}") from e


def engine_argv(config: EngineConfig) -> list[str]:
    out = []
    for flag, name in ENGINE_FLAGS.items():
        value = getattr(config, name)
        if value is not None:
            out += [flag, str(value)]
    return out


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def cmd_prefill(args) -> None:
    from baton.engine import Engine
    from prefill.service import main

    main(Engine.build(engine_config(args)), args.id, args.gateway, args.http_port)


def cmd_decode(args) -> None:
    from baton.engine import Engine
    from decode.service import main

    main(Engine.build(engine_config(args)), args.id, args.gateway, args.kv_addr, args.http_port)


def cmd_gateway(args) -> None:
    import uvicorn

    from gateway.app import create_app

    model_dir = Path(args.model) if args.model else default_model_dir()
    app = create_app(
        model_dir,
        args.zmq_addr,
        model_name=args.model_name or model_dir.name,
        api_key=args.api_key,
        max_model_len=args.max_model_len,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def default_model_dir() -> Path:
    from baton.model.loader import resolve_model_dir

    return resolve_model_dir(None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_cpus(spec: str | None) -> set[int] | None:
    """'0', '0-3', '0,2' -> a CPU set; None/'' -> no pinning."""
    if not spec:
        return None
    cpus: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def default_cpus(role: str) -> str | None:
    """On a machine with 2+ cores, prefill gets the first half and decode the rest, so
    prefill never steals decode's cores."""
    n = len(os.sched_getaffinity(0))
    if n < 2:
        return None
    half = n // 2
    return f"0-{half - 1}" if role == "prefill" else f"{half}-{n - 1}"


class Stack:
    """The child processes of `baton up`, each with its own log file."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.manifest: dict[str, dict] = {}

    def spawn(self, name: str, argv: list[str], cpus: set[int] | None, **info) -> None:
        log = (self.log_dir / f"{name}.log").open("w")
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        cmd = [sys.executable, "-m", "baton.cli", *argv]
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin
        )
        self.manifest[name] = {"pid": self.procs[name].pid, "cpus": sorted(cpus or []), **info}
        # stack.json: who runs where, for operators and tests
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


def cmd_up(args) -> None:
    config = engine_config(args)
    model_dir = Path(config.model) if config.model and Path(config.model).is_dir() else None
    if model_dir is None:
        from baton.model.loader import resolve_model_dir

        print("preparing the model (the first run converts the GGUF once) ...", flush=True)
        model_dir = resolve_model_dir(config.model)
    config = msgspec.structs.replace(config, model=str(model_dir))
    zmq_addr = f"tcp://127.0.0.1:{free_port()}"
    stack = Stack(Path(args.log_dir))
    gw = [
        "gateway",
        "--model",
        str(model_dir),
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--zmq-addr",
        zmq_addr,
    ]
    if args.api_key:
        gw += ["--api-key", args.api_key]
    if config.max_model_len:
        gw += ["--max-model-len", str(config.max_model_len)]
    stack.spawn("gateway", gw, None, role="gateway", url=f"http://{args.host}:{args.port}")
    for role, count, cpus_spec in (
        ("prefill", args.prefill, args.prefill_cpus),
        ("decode", args.decode, args.decode_cpus),
    ):
        cpus = parse_cpus(cpus_spec if cpus_spec is not None else default_cpus(role))
        threads = config.threads or (len(cpus) if cpus else None)
        for i in range(count):
            port = free_port()
            argv = [role, "--id", f"{role}-{i}", "--gateway", zmq_addr, "--http-port", str(port)]
            if role == "decode":
                kv = (
                    f"ipc:///tmp/baton-{os.getpid()}-{role}-{i}.kv"
                    if args.transport == "zmq-ipc"
                    else "tcp://127.0.0.1:*"
                )
                argv += ["--kv-addr", kv]
            cfg = msgspec.structs.replace(config, threads=threads)
            url = f"http://127.0.0.1:{port}"
            stack.spawn(f"{role}-{i}", argv + engine_argv(cfg), cpus, role=role, url=url)

    def shutdown(*_):
        print("stopping ...", flush=True)
        stack.stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    url = f"http://{args.host}:{args.port}"
    deadline = time.monotonic() + args.start_timeout
    while not healthy(url):
        if dead := stack.dead():
            stack.stop()
            sys.exit(f"{', '.join(dead)} exited during start-up; see {args.log_dir}/")
        if time.monotonic() > deadline:
            stack.stop()
            sys.exit(f"the stack was not healthy after {args.start_timeout}s; see {args.log_dir}/")
        time.sleep(0.3)
    print(
        f"Baton is up: {args.prefill} prefill + {args.decode} decode, model {model_dir.name}",
        flush=True,
    )
    print(f"  OpenAI API: {url}/v1   (logs in {args.log_dir}/)", flush=True)
    while True:
        time.sleep(1)
        if dead := stack.dead():
            print(f"warning: {', '.join(dead)} exited; see {args.log_dir}/", flush=True)
            for name in dead:
                stack.procs.pop(name)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start gateway + prefill + decode services on this machine")
    add_engine_args(up)
    up.add_argument("--prefill", type=int, default=1, help="prefill services")
    up.add_argument("--decode", type=int, default=1, help="decode services")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--transport", choices=["zmq-tcp", "zmq-ipc"], default="zmq-tcp")
    up.add_argument("--prefill-cpus", help="e.g. 0 or 0-3 (default: first half of the cores)")
    up.add_argument("--decode-cpus", help="e.g. 1 (default: second half of the cores)")
    up.add_argument("--api-key", default=None)
    up.add_argument("--log-dir", default="logs")
    up.add_argument("--start-timeout", type=float, default=300)
    up.set_defaults(func=cmd_up)

    gw = sub.add_parser("gateway", help="the OpenAI-compatible HTTP gateway")
    gw.add_argument("--model", help="model directory (for the tokenizer)")
    gw.add_argument("--model-name", default=None, help="the name /v1/models reports")
    gw.add_argument("--host", default="127.0.0.1")
    gw.add_argument("--port", type=int, default=8000)
    gw.add_argument("--zmq-addr", default="tcp://127.0.0.1:5555", help="where services connect")
    gw.add_argument("--api-key", default=None)
    gw.add_argument("--max-model-len", type=int, default=None)
    gw.set_defaults(func=cmd_gateway)

    for role, func in (("prefill", cmd_prefill), ("decode", cmd_decode)):
        s = sub.add_parser(role, help=f"a {role} service")
        add_engine_args(s)
        s.add_argument("--id", default=f"{role}-{socket.gethostname()}-{os.getpid()}")
        s.add_argument("--gateway", required=True, help="the gateway's ZeroMQ address")
        s.add_argument("--http-port", type=int, default=None, help="health + metrics port")
        if role == "decode":
            s.add_argument("--kv-addr", default="tcp://127.0.0.1:*", help="KV socket to bind")
        s.set_defaults(func=func)
    return p


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    args = parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
