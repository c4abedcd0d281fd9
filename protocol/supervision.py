"""Supervision rules, sans-I/O: restart policy, heartbeats, session states.

Time is always an argument (``now``, seconds on a monotonic clock), so crash
loops, backoff and heartbeat timeouts are tested without sleeping.

**Sessions and restarts.** A worker owns one WebRTC session; when it crashes
the session dies with it (its DTLS/SCTP state cannot be moved). The supervisor
ends the session at the client, the client asks again, and the new session
belongs to the same *lineage* — (device, client) — whose :class:`RestartPolicy`
decides: start now (first crash), start after a backoff delay (repeated
crashes), or refuse as FATAL (more than ``max_restarts`` crashes inside the
sliding ``window``) until the oldest crash leaves the window. A peer hanging
up, or an operator's ``kill``, is a clean end and never counts.

**Session states** (the ``state`` column of ``tunnelctl sessions``)::

    (new) ──► starting ──connected──► running ──ended/crashed──► exited
      │  ▲                 │   └──────stop──────► stopping ──exited──► exited
      │  └── elapsed ── backoff ──stop──► exited
      └─────► fatal (refused; kept visible, then forgotten)

Transitions are the table :data:`TRANSITIONS`; anything else raises
:class:`IllegalTransition`.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from protocol.backoff import Backoff
from protocol.errors import LocalProtocolError


class SessionState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    EXITED = "exited"
    FATAL = "fatal"


class SessionEvent(enum.Enum):
    CONNECTED = "connected"  # the worker reports the DataChannel open
    ENDED = "ended"  # clean end: a peer hung up, or the session was killed
    CRASHED = "crashed"  # the worker died or stopped answering heartbeats
    ELAPSED = "elapsed"  # the backoff delay is over; a worker is assigned
    STOP = "stop"  # kill or shutdown asked the worker to end
    EXITED = "exited"  # the worker is gone after a stop


S, E = SessionState, SessionEvent

TRANSITIONS: dict[tuple[SessionState, SessionEvent], SessionState] = {
    (S.BACKOFF, E.ELAPSED): S.STARTING,
    (S.BACKOFF, E.STOP): S.EXITED,
    (S.STARTING, E.CONNECTED): S.RUNNING,
    (S.STARTING, E.ENDED): S.EXITED,
    (S.STARTING, E.CRASHED): S.EXITED,
    (S.STARTING, E.STOP): S.STOPPING,
    (S.RUNNING, E.ENDED): S.EXITED,
    (S.RUNNING, E.CRASHED): S.EXITED,
    (S.RUNNING, E.STOP): S.STOPPING,
    (S.STOPPING, E.ENDED): S.EXITED,
    (S.STOPPING, E.CRASHED): S.EXITED,  # it died before ending cleanly: still a stop
    (S.STOPPING, E.EXITED): S.EXITED,
}


class IllegalTransition(LocalProtocolError):
    """The supervisor tried a transition the table does not allow."""


def transition(state: SessionState, event: SessionEvent) -> SessionState:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"no transition from {state.value} on {event.value}") from None


@dataclass(frozen=True, slots=True)
class StartNow:
    pass


@dataclass(frozen=True, slots=True)
class StartAfter:
    delay: float


@dataclass(frozen=True, slots=True)
class Refuse:
    until: float  # when the oldest crash leaves the window
    crashes: int


Decision = StartNow | StartAfter | Refuse


@dataclass(slots=True)
class RestartPolicy:
    """Crash intensity of one lineage over a sliding window, with backoff."""

    max_restarts: int = 5
    window: float = 60.0
    backoff: Backoff = field(default_factory=Backoff)
    # (time, jitter fraction) of each crash still in the window: the jitter is
    # drawn when the crash is recorded, so deciding changes nothing.
    _crashes: deque[tuple[float, float]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        if self.max_restarts < 0 or self.window <= 0:
            raise ValueError("max_restarts must be >= 0 and window > 0")

    def record_crash(self, now: float) -> None:
        while self._crashes and self._crashes[0][0] <= now - self.window:
            self._crashes.popleft()
        self._crashes.append((now, self.backoff.rng.random()))

    def crashes(self, now: float) -> int:
        """Crashes inside the window ending at ``now``."""
        return len(self._in_window(now))

    def decide(self, now: float) -> Decision:
        """What to do with a new session of this lineage at ``now`` (a query)."""
        crashes = self._in_window(now)
        if not crashes:
            return StartNow()
        if len(crashes) > self.max_restarts:
            return Refuse(until=crashes[0][0] + self.window, crashes=len(crashes))
        # The n-th crash in the window waits about base * 2**(n-1), jittered,
        # counted from that crash: a client that was slow to come back waits less.
        last, fraction = crashes[-1]
        delay = last + self.backoff.delay(len(crashes) - 1, fraction) - now
        return StartAfter(delay) if delay > 0 else StartNow()

    def idle(self, now: float) -> bool:
        """No crash in the window: the lineage can be forgotten."""
        return not self._in_window(now)

    def _in_window(self, now: float) -> list[tuple[float, float]]:
        return [c for c in self._crashes if c[0] > now - self.window]


@dataclass(slots=True)
class HeartbeatMonitor:
    """Declares a peer dead when nothing was heard from it for ``timeout`` seconds."""

    timeout: float
    last: float

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ValueError("heartbeat timeout must be > 0")

    def beat(self, now: float) -> None:
        self.last = max(self.last, now)

    def expired(self, now: float) -> bool:
        return now - self.last > self.timeout

    @property
    def deadline(self) -> float:
        return self.last + self.timeout
