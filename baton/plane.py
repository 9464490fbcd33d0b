"""Who may speak on the service plane: ZeroMQ CURVE keys, checked by a ZAP handler (pyzmq's
zmq.auth).

A key directory (`baton keys DIR`, mode 0700) holds:
- `server.key` / `server.key_secret`: the pair the sockets that bind serve with (the gateway's,
  each decode's KV socket); a client needs only `server.key`;
- `clients/<role>.key`: the public key of each role allowed in (gateway, prefill, decode),
  and `<role>.key_secret` beside the directory: the pair a service of that role connects with.

A peer without a listed key never completes the handshake: it can neither send nor read. A
key is bound to its role: the ZAP handler names each connection by its key's file name (the
messages' User-Id), and the gateway takes a heartbeat only from a service of the role its key
names, a decode takes KV hand-offs only from prefills. Every byte is encrypted, so a plane that
crosses hosts needs nothing more. Without a key directory, sockets are plain: `baton up` then
binds them all to files in a 0700 directory, which no other user can open.
"""

from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

ROLES = ("gateway", "prefill", "decode")
DOMAIN = "baton"


def generate(key_dir: str | Path) -> Path:
    """A new key directory: the server pair and one client pair per role."""
    root = Path(key_dir)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    root.chmod(0o700)
    (root / "clients").mkdir(mode=0o700, exist_ok=True)
    for name in ("server", *ROLES):
        public, secret = zmq.auth.create_certificates(str(root), name)
        Path(secret).chmod(0o600)
        if name != "server":
            Path(public).rename(root / "clients" / f"{name}.key")
    return root


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

    def connect_as(self, sock: zmq.Socket, role: str) -> None:
        """Make a socket that connects a CURVE client with `role`'s key (before connect)."""
        public, secret = zmq.auth.load_certificate(str(self.dir / f"{role}.key_secret"))
        sock.curve_secretkey, sock.curve_publickey = secret, public
        sock.curve_serverkey = self.server_public


class Authenticator(ThreadAuthenticator):
    """ZAP for one context: CURVE clients whose public key is in the key directory's clients/
    are let in, named by the key's file (the role)."""

    def __init__(self, ctx: zmq.Context, keys: Keys):
        super().__init__(ctx)
        clients = keys.dir / "clients"
        self.names = {
            zmq.auth.load_certificate(str(p))[0]: p.stem for p in sorted(clients.glob("*.key"))
        }
        self.start()
        self.configure_curve(domain=DOMAIN, location=str(clients))

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.names[zmq.utils.z85.encode(client_public_key)]


def peer_role(frame: zmq.Frame) -> str | None:
    """The role a received message's sender authenticated as (None on a plain socket)."""
    try:
        return frame.get("User-Id")
    except zmq.ZMQError:
        return None
