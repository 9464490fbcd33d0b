"""Agent sessions at the gateway: how long a turn's KV stays cached after it (the services
keep a session's blocks last, and write them to their KV tier), and how many sessions are
live. A session is named by the `x-session-id` header, or the body's `user` with
`[gateway] session_from_user`."""

import math
import time
from collections import OrderedDict
from collections.abc import Mapping

from baton.config import GatewayConfig
from baton.gateway.openai_types import BadRequest

MAX_TRACKED = 100_000  # live sessions counted at most (the oldest forgotten first)


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
