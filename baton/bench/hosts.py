"""Separate hosts on one machine, for tests and benchmarks (root only): a bridge in this
namespace and one network, UTS, mount and IPC namespace per host on it, each with its own
address, host name, /etc/hosts and /dev/shm, so that services see each other as other hosts
do (shared memory is not there; UCX takes TCP). tests/test_hosts.py and
benchmarks/hosts_handoff_bench.py run services on them."""

import os
import subprocess
from pathlib import Path

# a host's view: its name, /etc/hosts and /dev/shm its own, then the command
ENTER = (
    'hostname "$1" && mount -t tmpfs -o size=64m tmpfs /dev/shm && '
    'mount --bind "$2" /etc/hosts && shift 2 && exec "$@"'
)


class Hosts:
    """A bridge in this namespace and one namespace per host on it, joined by veth pairs;
    `hosts` maps each name to the address its /etc/hosts gives it. `resolve`: more names (or
    these, overridden), each to an address or to one of the hosts (a Service to its pod)."""

    made = 0

    def __init__(self, root: Path, names: list[str], resolve: dict[str, str] | None = None):
        Hosts.made += 1  # names of its own: a namespace dies with the last process in it
        self.tag = f"{os.getpid() % 1000}{Hosts.made}"
        net = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
        self.bridge, self.gateway_ip = f"btb{self.tag}", f"{net}.1"
        self.hosts = {n: f"{net}.{10 + i}" for i, n in enumerate(names)}
        self.procs: list[subprocess.Popen] = []
        self.root = root
        lines = ["127.0.0.1 localhost", *(f"{a} {n}" for n, a in self.hosts.items())]
        more = {n: self.hosts.get(a, a) for n, a in (resolve or {}).items()}
        lines += [f"{a} {n}" for n, a in more.items()]  # later lines lose: first wins
        self.hosts_file = root / "hosts"
        self.hosts_file.write_text("\n".join(reversed(lines)) + "\n")
        try:
            self.wire()
        except BaseException:
            self.close()
            raise

    def wire(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway_ip}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for i, name in enumerate(self.hosts):
            ns, outer, inner = self.ns(name), f"bt{self.tag}-{i}o", f"bt{self.tag}-{i}i"
            ip("netns", "add", ns)
            ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            ip("link", "set", inner, "netns", ns)
            ip("link", "set", outer, "master", self.bridge, "up")
            ip("-n", ns, "addr", "add", f"{self.hosts[name]}/24", "dev", inner)
            ip("-n", ns, "link", "set", inner, "up")
            ip("-n", ns, "link", "set", "lo", "up")

    def ns(self, name: str) -> str:
        return f"baton-{self.tag}-{name}"

    def run(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("w")
        cmd = ["ip", "netns", "exec", self.ns(name), "unshare", "--uts", "--mount", "--ipc",
               "--propagation", "private", "sh", "-c", ENTER, "sh", name, str(self.hosts_file),
               *argv]  # fmt: skip
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        return self.procs[-1]

    def cut(self, name: str) -> None:
        """Take the host's link to the bridge down: it is alive, and nobody can reach it."""
        ip("link", "set", f"bt{self.tag}-{list(self.hosts).index(name)}o", "down")

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(20)
        for i, name in enumerate(self.hosts):
            subprocess.run(["ip", "link", "del", f"bt{self.tag}-{i}o"], check=False)
            subprocess.run(["ip", "netns", "del", self.ns(name)], check=False)
        subprocess.run(["ip", "link", "del", self.bridge], check=False)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)
