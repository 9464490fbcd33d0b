"""Who may speak on the service plane: ZeroMQ CURVE keys, checked by a ZAP handler (pyzmq's
zmq.auth).

A key directory (`baton keys DIR`, mode 0700) holds:
- `server.key` / `server.key_secret`: the pair the sockets that bind serve with (the gateway's,
  each decode's KV socket); a client needs only `server.key`;
- `clients/<name>.key`: the public key of each client allowed in, and `<name>.key_secret`
  beside the directory: the pair it connects with. A name is a role (gateway, prefill,
  decode): a pool key, which every service of the role may hold (replicas that share one
  secret); or `<role>.<service id>`: one service's own key, which `baton up` makes for each
  service it starts and a service uses where it finds one.

A peer without a listed key never completes the handshake: it can neither send nor read. The
ZAP handler names each connection by its key's name (the messages' User-Id), and a message
counts only where that name may speak for its sender (`may_speak_for`): a pool key for any
service of its role, a service's own key for that service alone. So the gateway takes a
heartbeat, or a request's tokens, only from a key that speaks for the service sending them,
and a decode takes KV hand-offs only from prefills. Keys added while a service runs are read
when they first knock. Every byte is encrypted, so a plane that crosses hosts needs nothing
more. Without a key directory, sockets are plain: `baton up` then binds them all to files in
a 0700 directory, which no other user can open.
"""

import time
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

ROLES = ("gateway", "prefill", "decode")
DOMAIN = "baton"


RELOAD_S = 1.0  # an unknown key rereads clients/ at most this often


def generate(key_dir: str | Path) -> Path:
    """A new key directory: the server pair and one client pair per role (pool keys)."""
    root = Path(key_dir)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    root.chmod(0o700)
    (root / "clients").mkdir(mode=0o700, exist_ok=True)
    _, secret = zmq.auth.create_certificates(str(root), "server")
    Path(secret).chmod(0o600)
    for role in ROLES:
        _client_pair(root, role)
    return root


def issue(key_dir: str | Path, role: str, service_id: str) -> str:
    """One service's own key in an existing key directory (kept where it exists); its name."""
    name = f"{role}.{service_id}"
    if not (Path(key_dir) / f"{name}.key_secret").exists():
        _client_pair(Path(key_dir), name)
    return name


def _client_pair(root: Path, name: str) -> None:
    public, secret = zmq.auth.create_certificates(str(root), name)
    Path(secret).chmod(0o600)
    Path(public).rename(root / "clients" / f"{name}.key")


def may_speak_for(key_name: str | None, role: str, service_id: str) -> bool:
    """Whether a peer authenticated as `key_name` speaks for service `service_id` of `role`:
    a pool key (the role's name) for any service of the role, a service's own key for it."""
    return key_name in (role, f"{role}.{service_id}")


class Keys:
    def __init__(self, key_dir: str | Path):
        self.dir = Path(key_dir)
        if not (self.dir / "server.key").exists():
            raise SystemExit(f"no service-plane keys in {self.dir} (make them: baton keys DIR)")
        self.server_public, _ = zmq.auth.load_certificate(str(self.dir / "server.key"))

    def serve(self, sock: zmq.Socket) -> None:
        """Make a socket that binds a CURVE server (before its bind); its context needs an
        `Authenticator`."""
        public, secret = zmq.auth.load_certificate(str(self.dir / "server.key_secret"))
        sock.curve_secretkey, sock.curve_publickey = secret, public
        sock.zap_domain = DOMAIN.encode()
        sock.curve_server = True

    def connect_as(self, sock: zmq.Socket, role: str, service_id: str) -> None:
        """Make a socket that connects a CURVE client (before connect) with the service's own
        key where the directory has one, else its role's pool key."""
        own = self.dir / f"{role}.{service_id}.key_secret"
        path = own if own.exists() else self.dir / f"{role}.key_secret"
        public, secret = zmq.auth.load_certificate(str(path))
        sock.curve_secretkey, sock.curve_publickey = secret, public
        sock.curve_serverkey = self.server_public


class KeyNames:
    """The clients/ directory as public key -> name, reread (at most once per RELOAD_S) when a
    key it does not hold knocks: a service's key issued after this process started."""

    def __init__(self, clients: Path):
        self.clients, self.names, self.read_at = clients, {}, 0.0
        self.reread()  # then only from the authenticator's thread

    def reread(self) -> None:
        names = {zmq.auth.load_certificate(str(p))[0]: p.stem for p in self.clients.glob("*.key")}
        self.names, self.read_at = names, time.monotonic()

    def callback(self, domain: str, z85_key: bytes) -> bool:
        if z85_key not in self.names and time.monotonic() - self.read_at > RELOAD_S:
            self.reread()
        return z85_key in self.names


class Authenticator(ThreadAuthenticator):
    """ZAP for one context: CURVE clients whose public key is in the key directory's clients/
    are let in, named by the key's file (a role, or a role and a service id)."""

    def __init__(self, ctx: zmq.Context, keys: Keys):
        super().__init__(ctx)
        self.keys = KeyNames(keys.dir / "clients")
        self.start()
        self.configure_curve_callback(domain=DOMAIN, credentials_provider=self.keys)

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.keys.names[zmq.utils.z85.encode(client_public_key)]


def peer_key(frame: zmq.Frame) -> str | None:
    """The name of the key a received message's sender authenticated with (None on a plain
    socket)."""
    try:
        return frame.get("User-Id")
    except zmq.ZMQError:
        return None
