"""Logging that is safe to turn up: secrets redacted, remote-caused lines rate-limited.

Secrets: :class:`RedactSecrets` is the one filter that keeps tokens (JWTs,
whole or cut short, in a URL's ``token=`` or a JSON ``"token"``) and TURN
credentials (``"credential"``, ``credential=``, ``password``) out of every log
line, ours and third-party ones (websockets' frame dumps, aiortc's and aioice's
debug output), tracebacks included. :func:`redact_all_logs` puts it on every
handler of the root logger, which every record reaches whatever logger made
it; each process calls it once its handlers are set up (the CLI's
``setup_logging``, a worker's ``worker_main``).

Rate limits:

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
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = ["LogThrottle", "RedactSecrets", "redact", "redact_all_logs"]

REDACTED: Final = "<redacted>"

# A JWT is base64url JSON, so it starts with "eyJ" ('{"'): a whole one, or the
# start of one that a library cut short, is never logged.
_JWT_RE: Final = re.compile(r"eyJ[A-Za-z0-9_-]{2,}(?:\.[A-Za-z0-9_-]*){0,2}")
_KEYED_RE: Final = re.compile(
    r"""((?:token|credential|password|secret)(?:=|"\s*:\s*"|'\s*:\s*'))[^&"'\s]*""",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with every token and credential replaced by ``<redacted>``."""
    if "eyJ" in text:
        text = _JWT_RE.sub(REDACTED, text)
    lowered = text.lower()
    if any(k in lowered for k in ("token", "credential", "password", "secret")):
        text = _KEYED_RE.sub(r"\1" + REDACTED, text)
    return text


class RedactSecrets(logging.Filter):
    """Redact tokens and credentials in a record's message and traceback (:func:`redact`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def redact_all_logs() -> None:
    """Put :class:`RedactSecrets` on every handler of the root logger (idempotent)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())


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

    def warning(self, kind: str, msg: str, *args: object, now: float | None = None) -> bool:
        return self.log(logging.WARNING, kind, msg, *args, now=now)

    def info(self, kind: str, msg: str, *args: object, now: float | None = None) -> bool:
        return self.log(logging.INFO, kind, msg, *args, now=now)

    def log(self, level: int, kind: str, msg: str, *args: object, now: float | None = None) -> bool:
        """Log ``msg % args`` unless ``kind`` is over its budget; return whether it was.

        ``now`` (a sans-I/O core's time) replaces the clock when given."""
        if not self._log.isEnabledFor(level):
            return False
        if now is None:
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
