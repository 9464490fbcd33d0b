"""A request's cache scope at the gateway: whose cached prefixes it may share (its tenant's
and its cache_salt's), and, for agent sessions, how long a turn's KV stays cached after it
(the services keep a session's blocks last, and write them to their KV tier), and how many
sessions are live. A session is named by the `x-session-id` header, or the body's `user`
with `[gateway] session_from_user`."""

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from baton.config import GatewayConfig
from baton.gateway.openai_types import BadRequest

MAX_TRACKED = 100_000  # live sessions counted at most (the oldest forgotten first)


@dataclass(frozen=True)
class CacheScope:
    ttl_s: float = 0.0  # how long its KV stays cached after it (a session's turn)
    salt: bytes | None = None  # the root of its block hash chain (SamplingParams.cache_salt)


def cache_salt(tenant: str | None, salt: str | None) -> bytes | None:
    """The hash chain root of a request's blocks: equal only for one tenant's (API key's)
    requests with one cache_salt (vLLM's field), so no other request's prefix hit, or its
    timing, can tell what they sent. None for neither: the cache shared by all."""
    if tenant is None and salt is None:
        return None
    scope = f"{tenant or ''}\0{salt or ''}".encode()
    return hashlib.blake2b(scope, digest_size=16, person=b"baton-salt").digest()


def session_ttl(
    headers: Mapping[str, str], user: str | None, config: GatewayConfig
) -> tuple[str | None, float]:
    """The session a turn belongs to, and the seconds its KV stays cached after the turn:
    session_ttl_s, or what x-session-ttl-s asks, up to max_session_ttl_s; no session: 0."""
    session = headers.get("x-session-id") or (user if config.session_from_user else None)
    raw = headers.get("x-session-ttl-s")
    if raw is None:
        return session, config.session_ttl_s if session else 0.0
    if not session:
        raise BadRequest("x-session-ttl-s needs an x-session-id", "x-session-ttl-s")
    try:
        ttl = float(raw)
    except ValueError:
        ttl = math.nan
    if not 0 <= ttl < math.inf:
        raise BadRequest(f"x-session-ttl-s must be seconds >= 0, got {raw!r}", "x-session-ttl-s")
    return session, min(ttl, config.max_session_ttl_s)


class LiveSessions:
    """Sessions whose KV is still kept: seen, and their TTL not yet passed since."""

    def __init__(self, clock=time.monotonic):
        self.until: OrderedDict[str, float] = OrderedDict()  # least recently seen first
        self.clock = clock

    def seen(self, session: str | None, ttl_s: float) -> None:
        if session is None:
            return
        self.until[session] = self.clock() + ttl_s
        self.until.move_to_end(session)
        while len(self.until) > MAX_TRACKED:
            self.until.popitem(last=False)

    def count(self) -> int:
        now = self.clock()
        for session in [s for s, until in self.until.items() if until <= now]:
            del self.until[session]
        return len(self.until)
