"""`baton up | gateway | prefill | decode`: one CLI for every way of starting Baton.

`baton up` starts a gateway and N prefill + M decode services as child processes of this
one (the same subcommands, so compose and Kubernetes run exactly what `up` runs), pins them to
CPUs, waits until the stack is healthy, and stops everything on Ctrl-C or SIGTERM.
"""

import argparse
import logging
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from baton.config import BatonConfig, ConfigError, load_config, to_toml
from baton.probe import Probe, serve_probe

if TYPE_CHECKING:
    from baton.plane import Keys


def on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


# flag -> dotted config key; a flag given on the command line overrides the --config file
PLANE_FLAGS = {"--key-dir": ("key_dir", str)}
ENGINE_FLAGS = {
    "--model": ("engine.model", str),
    "--dtype": ("engine.dtype", str),
    "--kv-dtype": ("engine.kv_dtype", str),
    "--quantization": ("engine.quantization", str),
    "--block-size": ("engine.block_size", int),
    "--num-blocks": ("engine.num_blocks", int),
    "--kv-cache-gib": ("engine.kv_cache_gib", float),
    "--kv-tier-dir": ("engine.kv_tier_dir", str),
    "--kv-tier-gib": ("engine.kv_tier_gib", float),
    "--kv-tier-ram-gib": ("engine.kv_tier_ram_gib", float),
    "--max-num-seqs": ("engine.max_num_seqs", int),
    "--max-num-batched-tokens": ("engine.max_num_batched_tokens", int),
    "--max-chunk-tokens": ("engine.max_chunk_tokens", int),
    "--max-model-len": ("engine.max_model_len", int),
    "--threads": ("engine.threads", int),
}
GATEWAY_FLAGS = {
    "--host": ("gateway.host", str),
    "--port": ("gateway.port", int),
    "--api-key": ("gateway.api_key", str),
    "--api-key-file": ("gateway.api_key_file", str),
    "--busy-prefill-tokens": ("gateway.busy_prefill_tokens", int),
    "--chat-template": ("gateway.chat_template", str),
    "--tool-call-parser": ("gateway.tool_call_parser", str),
    "--reasoning-parser": ("gateway.reasoning_parser", str),
    "--write-timeout-s": ("gateway.write_timeout_s", float),
    "--resume-wait-s": ("gateway.resume_wait_s", float),
    "--max-connections": ("gateway.max_connections", int),
}
UP_FLAGS = {
    **PLANE_FLAGS,
    **ENGINE_FLAGS,
    **GATEWAY_FLAGS,
    "--prefill": ("prefill.count", int),
    "--decode": ("decode.count", int),
    "--prefill-cpus": ("prefill.cpus", str),
    "--decode-cpus": ("decode.cpus", str),
    "--transport": ("transport", str),
    "--kv-peer-timeout-s": ("kv_peer_timeout_s", float),
    "--stream-kv": ("stream_kv", on_off),
    "--max-services": ("autoscale.max_services", int),
}


def add_config_args(p: argparse.ArgumentParser, flags: dict[str, tuple[str, type]]) -> None:
    p.add_argument("--config", help="TOML config file (`baton config show` prints every key)")
    for flag, (key, kind) in flags.items():
        p.add_argument(flag, dest=key, type=kind, default=None, help=f"overrides {key}")
    p.set_defaults(config_flags=flags)


def config_from(args: argparse.Namespace) -> BatonConfig:
    overrides = {key: getattr(args, key) for key, _ in args.config_flags.values()}
    try:
        return load_config(args.config, overrides)
    except ConfigError as e:
        raise SystemExit(f"bad config: {e}") from e


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def start_probe(args) -> Probe | None:
    """Bound first, before the model loads: held from the start, the port cannot be taken by a
    sibling's port-0 bind meanwhile (`baton up` picks it free, then lets it go)."""
    return serve_probe(args.http_port, args.http_host) if args.http_port else None


def cmd_prefill(args) -> None:
    probe = start_probe(args)
    from baton.prefill.service import main

    config = config_from(args)
    engine = config.engine_for("prefill")
    tpot_s = config.slo.tpot_ms / 1000
    keys = plane_keys(config)
    main(engine, config.transport, args.id, args.gateway, probe, config.stream_kv, tpot_s, keys)


def cmd_decode(args) -> None:
    probe = start_probe(args)
    from baton.decode.service import main

    config = config_from(args)
    tpot_s = config.slo.tpot_ms / 1000
    main(
        config.engine_for("decode"),
        config.transport,
        args.id,
        args.gateway,
        args.kv_addr,
        probe,
        tpot_s,
        plane_keys(config),
        config.kv_peer_timeout_s,
    )


def plane_keys(config: BatonConfig) -> "Keys | None":
    """The service plane's keys, or None: plain sockets."""
    from baton.plane import Keys

    return Keys(config.key_dir) if config.key_dir else None


def cmd_keys(args) -> None:
    """Once: a directory that holds keys keeps them (compose runs this at every start); each
    --service adds that service's own key where it has none."""
    from baton.plane import ROLES, generate, issue

    root = Path(args.dir)
    if (root / "server.key").exists():
        print(f"service-plane keys already in {root}: kept")
    elif root.exists() and any(root.iterdir()):
        raise SystemExit(f"{root} is not empty: keys go into a new directory")
    else:
        print(f"service-plane keys in {generate(root)}: pass --key-dir {root}")
    for spec in args.service:
        role, _, service_id = spec.partition(":")
        if role not in ROLES or not service_id:
            raise SystemExit(f"--service {spec!r}: expected ROLE:ID, ROLE one of {ROLES}")
        print(f"{service_id}'s own key: {issue(root, role, service_id)}")


def cmd_gateway(args) -> None:
    config = config_from(args)
    gw = config.gateway
    # bound before FastAPI and the tokenizer load, for the reason start_probe gives
    family = socket.AF_INET6 if ":" in gw.host else socket.AF_INET
    sock = socket.create_server((gw.host, gw.port), family=family)
    probe = start_probe(args)
    from baton.model.files import resolve_model_dir

    model_dir = resolve_model_dir(config.engine.model)  # torch only to convert a new GGUF
    # The gateway process never loads torch (design.md). transformers imports it whenever it
    # is installed; marked absent, it serves the tokenizers without it.
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type]
    import uvicorn

    from baton.gateway.app import create_app

    if gw.zmq_addr is None:
        gw = msgspec.structs.replace(gw, zmq_addr="tcp://127.0.0.1:5555")
    app = create_app(model_dir, msgspec.structs.replace(config, gateway=gw), probe)
    # uvicorn answers 503 past limit_concurrency (reliability review L15)
    server = uvicorn.Config(app, log_level="warning", limit_concurrency=gw.max_connections)
    uvicorn.Server(server).run(sockets=[sock])


def cmd_prepare(args) -> None:
    """Convert the configured model once (a GGUF becomes safetensors in the cache), so the
    services that start next all load the same files (compose runs this first); with
    --kernels, build the CPU kernels into the cache too, which each engine would otherwise
    compile as it starts (seconds of a core each)."""
    from baton.model.files import resolve_model_dir

    print(resolve_model_dir(config_from(args).engine.model))
    if args.kernels:
        from baton.kernels import native

        lib = native.load()  # None: no compiler here (logged); the engines run on torch then
        print(f"kernels: {lib._name if lib is not None else 'not built'}", file=sys.stderr)


def cmd_config_show(args) -> None:
    print(to_toml(config_from(args)), end="")


def cmd_up(args) -> None:
    from baton.up import up

    config = config_from(args)
    if args.autoscale and not config.autoscale.max_services:  # a service per CPU
        shares = len(os.sched_getaffinity(0))
        autoscale = msgspec.structs.replace(config.autoscale, max_services=shares)
        config = msgspec.structs.replace(config, autoscale=autoscale)
    up(config, Path(args.log_dir), args.start_timeout)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start gateway + prefill + decode services on this machine")
    add_config_args(up, UP_FLAGS)
    up.add_argument("--log-dir", default="logs")
    up.add_argument("--start-timeout", type=float, default=300)
    up.add_argument(
        "--autoscale",
        action="store_true",
        help="move the CPUs between a prefill and a decode engine as the load's mix shifts, "
        "in --max-services shares (unset: one per CPU)",
    )
    up.set_defaults(func=cmd_up)

    gw = sub.add_parser("gateway", help="the OpenAI-compatible HTTP gateway")
    add_config_args(
        gw,
        {
            "--model": ENGINE_FLAGS["--model"],
            "--max-model-len": ENGINE_FLAGS["--max-model-len"],
            **GATEWAY_FLAGS,
            "--model-name": ("gateway.model_name", str),
            "--zmq-addr": ("gateway.zmq_addr", str),
            **PLANE_FLAGS,
        },
    )
    add_probe_args(gw, "health + metrics without the API key, for an internal scraper")
    gw.set_defaults(func=cmd_gateway)

    for role, func in (("prefill", cmd_prefill), ("decode", cmd_decode)):
        s = sub.add_parser(role, help=f"a {role} service")
        add_config_args(s, {**PLANE_FLAGS, **ENGINE_FLAGS})
        s.add_argument("--id", default=f"{role}-{socket.gethostname()}-{os.getpid()}")
        s.add_argument("--gateway", required=True, help="the gateway's ZeroMQ address")
        add_probe_args(s, "health + metrics port")
        if role == "decode":
            s.add_argument("--kv-addr", default="tcp://127.0.0.1:*", help="KV socket to bind")
        s.set_defaults(func=func)

    keys = sub.add_parser("keys", help="make the service plane's CURVE keys (once) in a directory")
    keys.add_argument("dir", help="made 0700; pass it to every service as --key-dir")
    keys.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="ROLE:ID",
        help="also a key of this service's own, which speaks for it alone (repeatable)",
    )
    keys.set_defaults(func=cmd_keys)

    prepare = sub.add_parser("prepare", help="convert the model once into the cache; print its dir")
    add_config_args(prepare, {"--model": ENGINE_FLAGS["--model"]})
    prepare.add_argument(
        "--kernels", action="store_true", help="build the CPU kernels into the cache too"
    )
    prepare.set_defaults(func=cmd_prepare)

    config = sub.add_parser("config", help="configuration tools")
    show = config.add_subparsers(dest="action", required=True).add_parser(
        "show", help="print the effective config (file + flags + defaults) as TOML"
    )
    add_config_args(show, UP_FLAGS)
    show.set_defaults(func=cmd_config_show)

    from baton.bench.cli import add_parser as add_bench_parser  # argparse only
    from baton.k8s import add_parser as add_k8s_parser  # argparse only
    from baton.plan.cli import add_parser as add_plan_parser  # argparse only

    add_bench_parser(sub)
    add_plan_parser(sub)
    add_k8s_parser(sub)
    return p


def add_probe_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--http-port", type=int, default=None, help=what)
    p.add_argument("--http-host", default="127.0.0.1", help="where that port listens")


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    args = parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
