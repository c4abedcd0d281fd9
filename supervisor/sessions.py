"""The supervisor's session table and restart lineages, sans-I/O.

A row per session the signaling server asked for (PROTOCOL.md §4, the
``sessions`` reply), moved only through :func:`protocol.supervision.transition`;
ended rows stay visible for :data:`RETAIN_EXITED` seconds (at most
:data:`MAX_EXITED_ROWS` of them). A *lineage* is a (device, client) pair: its
:class:`~protocol.supervision.RestartPolicy` counts the crashes of its sessions.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from protocol.backoff import Backoff
from protocol.signaling import SignalingMessage
from protocol.supervision import RestartPolicy, SessionEvent, SessionState, transition

RETAIN_EXITED = 120.0  # seconds an ended session stays visible in `sessions`
MAX_EXITED_ROWS = 200
MAX_PENDING_SIGNALS = 64  # signaling held for a session whose worker is not there yet

#: States in which a session counts against the device's limit.
ACTIVE = (SessionState.STARTING, SessionState.RUNNING, SessionState.BACKOFF, SessionState.STOPPING)
#: States in which a session has (or waits for) a worker process.
LIVE = (SessionState.STARTING, SessionState.RUNNING, SessionState.STOPPING)
ENDED = (SessionState.EXITED, SessionState.FATAL)


@dataclass(eq=False)
class SessionRow:
    id: str
    device: str
    client: str
    state: SessionState
    created: float
    restarts: int = 0
    worker: str | None = None  # its worker's id
    worker_pid: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    streams: int = 0
    # By service: (name, bytes_in, bytes_out, streams_opened), from its heartbeats.
    services: tuple[tuple[str, int, int, int], ...] = ()
    path: str | None = None
    pair: str | None = None
    relay_transport: str | None = None
    reason: str | None = None
    ended_at: float | None = None
    start_at: float | None = None  # backoff: when to start
    give_up_at: float | None = None  # starting: when an unfinished negotiation is given up
    running_at: float | None = None  # when it connected (its set-up time: minus created)
    pending: list[SignalingMessage] = field(default_factory=list)

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "device": self.device,
            "client": self.client,
            "state": self.state.value,
            "worker_pid": self.worker_pid if self.worker else None,
            "age_s": round(now - self.created, 3),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "streams": self.streams,
            "restarts": self.restarts,
            "path": self.path,
            "pair": self.pair,
            "relay_transport": self.relay_transport,
            "reason": self.reason,
        }

    def move(self, now: float, event: SessionEvent, *, reason: str | None = None) -> None:
        self.state = transition(self.state, event)
        if self.state is SessionState.RUNNING and self.running_at is None:
            self.running_at = now
        if reason is not None:
            self.reason = reason
        if self.state in ENDED:
            self.ended_at = now


class Sessions:
    """The rows by id, in the order they were asked for, and the lineages."""

    def __init__(
        self,
        *,
        max_restarts: int,
        window: float,
        backoff_base: float,
        backoff_cap: float,
        rng: random.Random,
    ) -> None:
        self._rows: dict[str, SessionRow] = {}
        self.lineages: dict[tuple[str, str], RestartPolicy] = {}
        self._max_restarts = max_restarts
        self._window = window
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._rng = rng
        #: Called with each ended row as it leaves the table (metrics fold it in).
        self.on_retire: Callable[[SessionRow], None] | None = None

    def __iter__(self) -> Iterator[SessionRow]:
        return iter(list(self._rows.values()))

    def __contains__(self, session: object) -> bool:
        return session in self._rows

    def get(self, session: str | None) -> SessionRow | None:
        return self._rows.get(session) if session is not None else None

    def add(self, row: SessionRow) -> None:
        self._rows[row.id] = row

    def active(self, device: str) -> int:
        return sum(1 for r in self._rows.values() if r.device == device and r.state in ACTIVE)

    def negotiating(self, device: str, client: str) -> int:
        """Sessions of ``client`` with ``device`` not connected yet (or backing off to)."""
        return sum(
            1
            for r in self._rows.values()
            if (r.device, r.client) == (device, client)
            and r.state in (SessionState.STARTING, SessionState.BACKOFF)
        )

    def of_worker(self, worker: str) -> list[SessionRow]:
        """The rows whose worker is ``worker`` and still live."""
        return [r for r in self._rows.values() if r.worker == worker and r.state in LIVE]

    def lineage(self, device: str, client: str) -> RestartPolicy:
        key = (device, client)
        policy = self.lineages.get(key)
        if policy is None:
            policy = self.lineages[key] = RestartPolicy(
                self._max_restarts,
                self._window,
                Backoff(
                    base=self._backoff_base,
                    cap=self._backoff_cap,
                    floor=min(0.05, self._backoff_base),
                    rng=self._rng,
                ),
            )
        return policy

    def prune(self, now: float) -> None:
        ended = [r for r in self._rows.values() if r.ended_at is not None]
        ended.sort(key=lambda r: r.ended_at or 0.0)
        excess = len(ended) - MAX_EXITED_ROWS
        for i, row in enumerate(ended):
            if i < excess or now - (row.ended_at or now) > RETAIN_EXITED:
                self._rows.pop(row.id, None)
                if self.on_retire is not None:
                    self.on_retire(row)
        for key in [k for k, p in self.lineages.items() if p.idle(now)]:
            if not any((r.device, r.client) == key for r in self._rows.values()):
                del self.lineages[key]

    def next_start(self) -> float | None:
        starts = [
            r.start_at
            for r in self._rows.values()
            if r.state is SessionState.BACKOFF and r.start_at is not None
        ]
        return min(starts, default=None)
