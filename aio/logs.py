"""Log lines that remote input causes, rate-limited.

A peer decides how often a "failed authentication" or "refused connection"
line is written; unthrottled, that is a way to fill a disk. :class:`LogThrottle`
lets ``burst`` lines of one kind through per ``interval`` and counts the rest;
the next line of that kind that goes through says how many were suppressed::

    throttle = LogThrottle(log, interval=10.0, burst=5)
    throttle.warning("auth", "conn %d: authentication failed: %s", conn, reason)

Time is injected (``now``) for tests; by default it is ``time.monotonic()``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["LogThrottle"]


@dataclass(slots=True)
class _Window:
    start: float
    emitted: int = 0
    suppressed: int = 0


class LogThrottle:
    """At most ``burst`` lines per ``interval`` seconds for each kind (a string key)."""

    def __init__(
        self,
        log: logging.Logger,
        *,
        interval: float = 10.0,
        burst: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval <= 0 or burst < 1:
            raise ValueError("interval must be > 0 and burst >= 1")
        self._log = log
        self._interval = interval
        self._burst = burst
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def warning(self, kind: str, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, kind, msg, *args)

    def info(self, kind: str, msg: str, *args: object) -> bool:
        return self.log(logging.INFO, kind, msg, *args)

    def log(self, level: int, kind: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless ``kind`` is over its budget; return whether it was."""
        if not self._log.isEnabledFor(level):
            return False
        now = self._clock()
        window = self._windows.get(kind)
        if window is None or now - window.start >= self._interval:
            suppressed = window.suppressed if window is not None else 0
            window = self._windows[kind] = _Window(now)
            if suppressed:
                msg += " (%d similar line(s) suppressed in the previous %g s)"
                args = (*args, suppressed, self._interval)
        if window.emitted >= self._burst:
            window.suppressed += 1
            return False
        window.emitted += 1
        self._log.log(level, msg, *args)
        return True

    def suppressed(self, kind: str) -> int:
        """Lines of ``kind`` suppressed in the current window."""
        window = self._windows.get(kind)
        return window.suppressed if window is not None else 0
