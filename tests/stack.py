"""Start a real `baton up` stack (separate processes, real sockets) for a test."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Stack:
    def __init__(
        self,
        log_dir: Path,
        model: Path,
        *args: str,
        prefill: int = 1,
        decode: int = 1,
        python: str = sys.executable,
        cwd: Path | None = None,
    ):
        self.log_dir = log_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            python, "-P", "-m", "baton.cli", "up", "--model", str(model), "--dtype", "float32",
            "--port", str(self.port), "--log-dir", str(log_dir),
            "--prefill", str(prefill), "--decode", str(decode), *args,
        ]  # fmt: skip
        up_log = log_dir.parent / f"{log_dir.name}-up.log"
        self.out = up_log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=subprocess.STDOUT, cwd=cwd)
        deadline = time.monotonic() + 180
        while "Baton is up" not in up_log.read_text():  # every service has registered
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"stack did not start: {self.logs()}")
            time.sleep(0.3)

    def services(self, role: str | None = None) -> dict[str, dict]:
        manifest = json.loads((self.log_dir / "stack.json").read_text())
        return {n: s for n, s in manifest.items() if role in (None, s["role"])}

    def client(self) -> openai.OpenAI:
        """The official client on this stack's API; no retries: each call is one request."""
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def health(self, name: str) -> dict:
        _, body = get(f"{self.services()[name]['url']}/health")
        return json.loads(body)

    def metric(self, name: str, metric: str, **labels: str) -> float:
        """The sample of `metric` whose labels include `labels` (0 if none)."""
        _, body = get(f"{self.services()[name]['url']}/metrics")
        want = "".join(rf'(?=[^}}]*\b{k}="{re.escape(v)}")' for k, v in labels.items())
        labelled = rf"\{{{want}[^}}]*\}}" if labels else r"(?:\{[^}]*\})?"
        m = re.search(rf"^{metric}{labelled} (\S+)$", body.decode(), re.M)
        return float(m.group(1)) if m else 0.0

    def blocks_used(self) -> dict[str, int]:
        out = {}
        for name, s in self.services().items():
            if s["role"] != "gateway" and os.path.exists(f"/proc/{s['pid']}"):
                load = self.health(name)["load"]
                out[name] = load["total_blocks"] - load["free_blocks"]
        return out

    def wait_blocks_free(self, timeout: float = 15) -> dict[str, int]:
        """Block usage of every live service, once all are zero or the timeout passes."""
        deadline = time.monotonic() + timeout
        while any((used := self.blocks_used()).values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return used

    def pid(self, name: str) -> int:
        return self.services()[name]["pid"]

    def kill(self, name: str) -> None:
        os.kill(self.services()[name]["pid"], signal.SIGKILL)

    def logs(self) -> str:
        return "\n".join(
            f"== {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.log_dir.glob("*.log"))
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for s in self.services().values() if (self.log_dir / "stack.json").exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(s["pid"], signal.SIGKILL)
