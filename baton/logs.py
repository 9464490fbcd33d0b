"""Log lines a peer can cause, at most one a period: a flood of malformed messages is
counted by the metrics, not written line by line to a disk it could fill (reliability review
L17). No torch here: the gateway uses it too."""

import logging
import time
from collections.abc import Callable


class ThrottledLog:
    def __init__(
        self,
        log: logging.Logger,
        period_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.log, self.period_s, self.clock = log, period_s, clock
        self.next_at = float("-inf")
        self.suppressed = 0  # lines not written since the last one

    def warning(self, msg: str, *args: object) -> None:
        now = self.clock()
        if now < self.next_at:
            self.suppressed += 1
            return
        if self.suppressed:
            msg, args = f"{msg} (and {self.suppressed} more since the last)", args
        self.log.warning(msg, *args)
        self.suppressed, self.next_at = 0, now + self.period_s
