"""The worker pool, sans-I/O: each worker process's lifecycle as one state machine.

A worker is forked by the fork server either for the pool (it will wait idle,
with its PeerConnection and offer prepared) or *reserved* for one session that
found no idle worker (a cold start). Its states, and the only moves between
them (:data:`WORKER_TRANSITIONS`; anything else raises
:class:`IllegalWorkerTransition`)::

    spawning ──hello──► idle ──take──► busy ──ended──► exiting
    reserved ──hello──────────────────► busy
                        idle ◄──released── busy   (its negotiation was given up)
    spawning ◄──released── reserved                (given up before its hello)
    any state but gone ──exit──► gone      (late messages, "ended" included, still count)

``gone`` is the process's exit seen (pidfd); the worker is forgotten once its
sessions are judged (clean end or crash, :mod:`supervisor.core`). A worker is
never offered to two sessions at once: only ``idle`` workers are taken, and
taking one moves it out of ``idle`` in the same step. A busy worker goes back to
``idle`` only by ``released``, its answer to the ``release`` of a session whose
negotiation was given up (PROTOCOL.md §3): that session is over by then. A cold
start whose session is given up before its hello joins the pool the same way.

``tunnelctl status`` shows ``reserved`` as ``spawning`` and ``gone`` as
``exiting`` (PROTOCOL.md §4): to an operator both are the same phase.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from protocol.errors import LocalProtocolError
from protocol.supervision import HeartbeatMonitor


class WorkerState(enum.Enum):
    SPAWNING = "spawning"  # asked of the fork server for the pool; no hello yet
    RESERVED = "reserved"  # asked for one waiting session (cold start); no hello yet
    IDLE = "idle"  # said hello; may be given a session
    BUSY = "busy"  # given a session (or taken for one that left meanwhile)
    EXITING = "exiting"  # said "ended"; its process is on its way out
    GONE = "gone"  # its process exited; its sessions await judgement


class WorkerEvent(enum.Enum):
    HELLO = "hello"  # the worker's first message
    TAKE = "take"  # a session request takes an idle worker
    ENDED = "ended"  # the worker says its session ended
    RELEASED = "released"  # its session was given up; it joins the pool
    EXIT = "exit"  # its process exited


W, WE = WorkerState, WorkerEvent

WORKER_TRANSITIONS: dict[tuple[WorkerState, WorkerEvent], WorkerState] = {
    (W.SPAWNING, WE.HELLO): W.IDLE,
    (W.RESERVED, WE.HELLO): W.BUSY,
    (W.IDLE, WE.TAKE): W.BUSY,
    (W.BUSY, WE.ENDED): W.EXITING,
    (W.BUSY, WE.RELEASED): W.IDLE,
    (W.RESERVED, WE.RELEASED): W.SPAWNING,
    (W.EXITING, WE.ENDED): W.EXITING,
    (W.GONE, WE.ENDED): W.GONE,  # "ended" read after the pidfd fired: still a clean end
    (W.SPAWNING, WE.EXIT): W.GONE,
    (W.RESERVED, WE.EXIT): W.GONE,
    (W.IDLE, WE.EXIT): W.GONE,
    (W.BUSY, WE.EXIT): W.GONE,
    (W.EXITING, WE.EXIT): W.GONE,
}

#: What ``tunnelctl status`` calls each state.
SHOWN_AS: dict[WorkerState, str] = {
    W.SPAWNING: "spawning",
    W.RESERVED: "spawning",
    W.IDLE: "idle",
    W.BUSY: "busy",
    W.EXITING: "exiting",
    W.GONE: "exiting",
}


class IllegalWorkerTransition(LocalProtocolError):
    """The supervisor tried a worker transition the table does not allow."""


def worker_transition(state: WorkerState, event: WorkerEvent) -> WorkerState:
    try:
        return WORKER_TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalWorkerTransition(
            f"no worker transition from {state.value} on {event.value}"
        ) from None


@dataclass(eq=False)
class Worker:
    """One worker process, as the supervisor knows it."""

    id: str
    hb: HeartbeatMonitor
    state: WorkerState
    deadline: float | None  # spawning/reserved: give up then; gone: judge then
    reserved_for: str | None = None  # the session a reserved worker was forked for
    pid: int | None = None
    session: str | None = None
    kill_reason: str | None = None  # why the supervisor killed it (it is no crash of its own)
    kill_at: float | None = None  # SIGKILL then if still there (after a Stop or Release)
    releasing: str | None = None  # the given-up session it was told to release

    def move(self, event: WorkerEvent) -> WorkerState:
        """Apply ``event``; return the state it left."""
        before = self.state
        self.state = worker_transition(before, event)
        return before

    @property
    def starting(self) -> bool:
        return self.state in (W.SPAWNING, W.RESERVED)


class Pool:
    """The workers by id, in the order they were asked for."""

    def __init__(self, heartbeat_timeout: float, new_id: Callable[[], str]) -> None:
        self._workers: dict[str, Worker] = {}
        self._heartbeat_timeout = heartbeat_timeout
        self._new_id = new_id

    def __iter__(self) -> Iterator[Worker]:
        return iter(list(self._workers.values()))

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._workers

    def get(self, worker_id: str) -> Worker | None:
        return self._workers.get(worker_id)

    def by_pid(self, pid: int) -> Worker | None:
        return next((w for w in self._workers.values() if w.pid == pid), None)

    def add(self, now: float, deadline: float, *, reserved_for: str | None = None) -> Worker:
        """A new worker, registered at once so that counts are exact."""
        worker = Worker(
            id=self._new_id(),
            hb=HeartbeatMonitor(self._heartbeat_timeout, now),
            state=W.RESERVED if reserved_for is not None else W.SPAWNING,
            deadline=deadline,
            reserved_for=reserved_for,
        )
        self._workers[worker.id] = worker
        return worker

    def remove(self, worker: Worker) -> None:
        self._workers.pop(worker.id, None)

    def reserved_for(self, session: str) -> Worker | None:
        """The cold start forked for ``session``, still on its way and not given up on."""
        return next(
            (
                w
                for w in self._workers.values()
                if w.state is W.RESERVED and w.reserved_for == session and w.kill_reason is None
            ),
            None,
        )

    def take_idle(self) -> Worker | None:
        """The first idle worker, moved to ``busy``: no other session can get it."""
        worker = next((w for w in self._workers.values() if w.state is W.IDLE), None)
        if worker is not None:
            worker.move(WE.TAKE)
        return worker

    def alive(self) -> int:
        """Workers whose process may still run (every state but ``gone``)."""
        return sum(1 for w in self._workers.values() if w.state is not W.GONE)

    def available(self) -> int:
        """Idle workers, pool workers on their way and workers being released,
        not given up on."""
        return sum(
            1
            for w in self._workers.values()
            if (w.state in (W.SPAWNING, W.IDLE) or (w.state is W.BUSY and w.releasing))
            and w.kill_reason is None
        )

    def count(self, *shown: str) -> int:
        return sum(1 for w in self._workers.values() if SHOWN_AS[w.state] in shown)
