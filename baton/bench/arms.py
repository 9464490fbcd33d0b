"""The systems `baton bench compare` measures, one after another on the same cores.

An arm is a command that starts a server, the URL it serves, a readiness probe, and how to
stop it. Built-in arms share one set of limits (model, dtype, cores, batch and KV sizes);
more come from a TOML file of `[[arm]]` tables with the fields of `Arm`, or as NAME=URL for
a server that is already running.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

from baton.bench import llamacpp


class Arm(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    url: str
    start: list[str] = []  # argv; empty: already serving at `url`
    stop: list[str] = []  # argv run when done; empty: SIGTERM to `start`'s process group
    env: dict[str, str] = {}  # added to this process's environment for start and stop
    ready_path: str = "/health"  # 200 here means ready
    ready_timeout_s: float = 900.0  # vLLM's first start compiles for minutes
    unavailable: str = ""  # non-empty: reported with this reason and never started


@dataclass(frozen=True)
class Limits:
    """What every built-in arm gets, so they differ only in how they serve."""

    model: str
    dtype: str
    cpus: list[int]
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_gib: int
    max_model_len: int | None


def cpu_spec(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5': the form `baton up` and VLLM_CPU_OMP_THREADS_BIND both read."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{lo}-{hi}" if hi > lo else str(lo) for lo, hi in runs)


def baton_up(name: str, limits: Limits, port: int, log_dir: Path) -> Arm:
    """baton-disagg: 1 prefill + 1 decode, each pinned to half the cores (`baton up`'s
    default split). baton-agg: one decode on all the cores that prefills locally (no
    prefill pool), the engine of `baton.LLM` behind the same gateway. baton-autoscale: the
    cores moved between a prefill and a decode engine as the load's mix wants (`--autoscale`,
    a share per core; one decode engine at first). A
    `-int8` name: the same with int8 weights (`--quantization int8`)."""
    half = max(1, len(limits.cpus) // 2)
    taskset = []
    if name == "baton-autoscale":  # its services' cores: the ones `baton up` may run on
        taskset = ["taskset", "-c", cpu_spec(limits.cpus)]
        pools = ["--prefill", "0", "--autoscale", "--max-services", str(len(limits.cpus))]
    elif name.startswith("baton-disagg"):
        pools = ["--prefill", "1", "--decode", "1", "--prefill-cpus", cpu_spec(limits.cpus[:half])]
        pools += ["--decode-cpus", cpu_spec(limits.cpus[half:] or limits.cpus)]
    else:
        pools = ["--prefill", "0", "--decode", "1", "--decode-cpus", cpu_spec(limits.cpus)]
    argv = [
        *taskset, sys.executable, "-P", "-m", "baton.cli", "up", "--model", limits.model,
        "--dtype", limits.dtype, "--port", str(port), "--log-dir", str(log_dir), *pools,
        "--max-num-seqs", str(limits.max_num_seqs),
        "--max-num-batched-tokens", str(limits.max_num_batched_tokens),
        "--kv-cache-gib", str(limits.kv_cache_gib),
    ]  # fmt: skip
    if limits.max_model_len:
        argv += ["--max-model-len", str(limits.max_model_len)]
    if name.endswith("-int8"):
        argv += ["--quantization", "int8"]
    return Arm(name=name, url=f"http://127.0.0.1:{port}", start=argv)


def vllm_cpu(limits: Limits, port: int, script: Path) -> Arm:
    """vLLM-CPU through the anchor script (`start` returns once /health is green)."""
    if not script.exists():
        return Arm(name="vllm-cpu", url="", unavailable=f"{script} not found (--vllm-script)")
    extra = [
        f"--max-num-seqs {limits.max_num_seqs}",
        f"--max-num-batched-tokens {limits.max_num_batched_tokens}",
    ]
    if limits.max_model_len:
        extra.append(f"--max-model-len {limits.max_model_len}")
    env = {
        "MODEL_DIR": limits.model,
        "DTYPE": limits.dtype,
        "KV_GB": str(limits.kv_cache_gib),
        "OMP_BIND": cpu_spec(limits.cpus),
        "EXTRA_ARGS": " ".join(extra),
    }
    cmd = ["bash", str(script)]
    return Arm(
        name="vllm-cpu",
        url=f"http://127.0.0.1:{port}",
        start=[*cmd, "start", str(port)],
        stop=[*cmd, "stop", str(port)],
        env=env,
    )


def llama_cpp(name: str, limits: Limits, port: int) -> Arm:
    """llama.cpp's llama-server (baton.bench.llamacpp), at the run's dtype or Q8_0."""
    try:
        argv = llamacpp.serve_argv(limits, port, name == "llama-cpp-q8", cpu_spec(limits.cpus))
    except llamacpp.Unprepared as e:
        return Arm(name=name, url="", unavailable=str(e))
    return Arm(name=name, url=f"http://127.0.0.1:{port}", start=argv)


BATON = ("baton-disagg", "baton-agg", "baton-autoscale", "baton-disagg-int8", "baton-agg-int8")
BUILTIN = (*BATON, "vllm-cpu", "llama-cpp", "llama-cpp-q8")


def resolve(
    names: list[str], limits: Limits, first_port: int, log_dir: Path, vllm_script: Path
) -> list[Arm]:
    """Built-in names or NAME=URL, in order; each started arm gets its own port."""
    arms = []
    for i, name in enumerate(names):
        port = first_port + i
        if "=" in name:
            label, url = name.split("=", 1)
            arms.append(Arm(name=label, url=url.rstrip("/")))
        elif name in BATON:
            arms.append(baton_up(name, limits, port, log_dir / name))
        elif name == "vllm-cpu":
            arms.append(vllm_cpu(limits, port, vllm_script))
        elif name in ("llama-cpp", "llama-cpp-q8"):
            arms.append(llama_cpp(name, limits, port))
        else:
            raise SystemExit(f"unknown arm {name!r}: use {', '.join(BUILTIN)} or NAME=URL")
    return arms


def load_arms(path: Path) -> list[Arm]:
    table = tomllib.loads(path.read_text()).get("arm", [])
    try:
        return msgspec.convert(table, list[Arm])
    except msgspec.ValidationError as e:
        raise SystemExit(f"bad arm in {path}: {e}") from e


def is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def running(arm: Arm, log_path: Path) -> Iterator[None]:
    """Starts the arm, waits for its probe, and stops it (and all it started) on exit."""
    env = {**os.environ, **arm.env}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc = None
    if arm.start:
        with log_path.open("w") as log:
            # its own session: stopping it reaches every process it started
            proc = subprocess.Popen(
                arm.start, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
    try:
        deadline = time.monotonic() + arm.ready_timeout_s
        while not is_ready(arm.url + arm.ready_path):
            # a start command may exit 0 once the server runs detached (vllm-cpu.sh start)
            if proc is not None and proc.poll() not in (None, 0):
                raise RuntimeError(f"start exited with {proc.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {arm.ready_timeout_s:g}s; see {log_path}")
            time.sleep(1)
        yield
    finally:
        if arm.stop:
            with log_path.open("a") as log:
                subprocess.run(arm.stop, stdout=log, stderr=subprocess.STDOUT, env=env)
        if proc is not None and proc.poll() is None:
            proc.terminate()  # `baton up` stops its services on SIGTERM
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever of its session is left
            proc.wait()
