"""An in-memory stage for :class:`supervisor.core.SupervisorCore`: a fake clock,
a fake fork server and fake workers that answer the way real ones do.

Nothing here starts a process or opens a socket: each helper is an event the
shell would feed, and every action the core returns is kept in ``out`` (the
whole history) for the test to look at.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable
from typing import Any, TypeVar

from protocol.ipc import (
    ControlRequest,
    Ended,
    Heartbeat,
    Hello,
    IpcMessage,
    Relay,
    Release,
    Released,
    StateReport,
    decode_control_reply,
    encode_control_request,
    encode_ipc,
)
from protocol.signaling import Answer, PeerLeft, SessionEnd, SessionRequest, encode_signaling
from supervisor.config import DeviceConfig, Service, SupervisorConfig
from supervisor.core import SupervisorCore
from supervisor.events import (
    Action,
    ControlFrames,
    Event,
    ForgetWorker,
    ForkServerUp,
    ForkWorker,
    KillProcess,
    SendSignal,
    SendToWorker,
    SignalReceived,
    WatchWorker,
    WorkerExitCode,
    WorkerFrames,
    WorkerGone,
    WorkerSpawned,
)
from supervisor.pool import Worker

A = TypeVar("A")
T0 = 1000.0
DEVICE = "dev-a"


def config(**tuning: Any) -> SupervisorConfig:
    tuning.setdefault("pool_size", 2)
    tuning.setdefault("heartbeat_interval", 1.0)
    tuning.setdefault("heartbeat_timeout", 5.0)
    return SupervisorConfig(
        "ws://127.0.0.1:9/signal",
        (DeviceConfig(DEVICE, "device-token", (Service("web", "127.0.0.1", 8080),)),),
        **tuning,
    )


def session_id(n: int) -> str:
    return f"session-{n:04d}"


class Stage:
    """One core, its clock, and what it asked for."""

    def __init__(self, seed: int = 7, **tuning: Any) -> None:
        self.now = T0
        ids = (f"w-{n:016x}" for n in itertools.count(1))
        self.core = SupervisorCore(
            config(**tuning),
            self.now,
            pid=4242,
            runtime_dir="/run/tunnelctl-test",
            rng=random.Random(seed),
            new_id=lambda: next(ids),
        )
        self.out: list[Action] = []
        self._pids = itertools.count(5001)
        self.pids: dict[str, int] = {}  # worker id -> pid given by the fake fork server

    # -- feeding -------------------------------------------------------------------------------

    def feed(self, event: Event) -> list[Action]:
        actions = self.core.handle(self.now, event)
        self.out += actions
        return actions

    def advance(self, seconds: float) -> list[Action]:
        """Let ``seconds`` pass, firing each deadline the core asked for on the way."""
        end = self.now + seconds
        actions: list[Action] = []
        while (deadline := self.core.next_deadline()) is not None and deadline <= end:
            self.now = max(self.now, deadline)
            actions += self.core.handle_timer(self.now)
        self.now = end
        self.out += actions
        return actions

    # -- the fake fork server and workers ------------------------------------------------------

    def boot(self) -> None:
        """Fork server up, and the pool's workers spawned and idle."""
        self.feed(ForkServerUp(4000))
        self.start_forked()

    def forked(self, actions: Iterable[Action] | None = None) -> list[str]:
        """Worker ids the core asked the fork server for and that have no pid yet."""
        asked = [
            a.worker
            for a in (self.out if actions is None else actions)
            if isinstance(a, ForkWorker)
        ]
        return [w for w in asked if w not in self.pids]

    def spawn(self, worker: str) -> int:
        pid = self.pids[worker] = next(self._pids)
        self.feed(WorkerSpawned(worker, pid))
        return pid

    def hello(self, worker: str) -> list[Action]:
        return self.send(worker, Hello(worker=worker, pid=self.pids[worker]))

    def start_forked(self) -> list[str]:
        """Spawn every worker asked for, each saying hello; return their ids."""
        started = self.forked()
        for worker in started:
            self.spawn(worker)
            self.hello(worker)
        return started

    def send(self, worker: str, message: IpcMessage) -> list[Action]:
        return self.feed(WorkerFrames((worker.encode(), encode_ipc(message))))

    def exit(self, worker: str, code: int | None, *, report_first: bool = False) -> list[Action]:
        """The worker's process ends: pidfd, and the fork server's report (if ``code``)."""
        pid = self.pids[worker]
        actions: list[Action] = []
        if code is not None and report_first:
            actions += self.feed(WorkerExitCode(pid, code))
        actions += self.feed(WorkerGone(worker))
        if code is not None and not report_first:
            actions += self.feed(WorkerExitCode(pid, code))
        return actions

    # -- sessions ------------------------------------------------------------------------------

    def request(self, session: str, client: str = "c1") -> list[Action]:
        return self.feed(SignalReceived(DEVICE, SessionRequest(session, DEVICE, client)))

    def answer(self, session: str, client: str = "c1") -> list[Action]:
        return self.feed(SignalReceived(DEVICE, Answer(session, "v=0 answer", client)))

    def client_left(self, session: str, client: str = "c1") -> list[Action]:
        return self.feed(SignalReceived(DEVICE, PeerLeft(session, client)))

    def end(self, session: str, client: str = "c1", reason: str = "bye") -> list[Action]:
        return self.feed(SignalReceived(DEVICE, SessionEnd(session, reason, client)))

    def connected(self, worker: str, session: str) -> list[Action]:
        return self.send(worker, StateReport(session, "connected", "direct", "host/srflx"))

    def ended(self, worker: str, session: str, reason: str = "peer hung up") -> list[Action]:
        return self.send(worker, Ended(session, reason, True))

    def released(self, worker: str, session: str) -> list[Action]:
        return self.send(worker, Released(session))

    def control(self, cmd: str, **args: object) -> Any:
        actions = self.feed(
            ControlFrames((b"cli", b"", encode_control_request(ControlRequest(cmd, args))))
        )
        reply = decode_control_reply(actions[-1].payload)  # type: ignore[union-attr]
        return reply.result if reply.ok else reply.error

    # -- looking -------------------------------------------------------------------------------

    def worker(self, worker_id: str) -> Worker:
        worker = self.core.pool.get(worker_id)
        assert worker is not None, worker_id
        return worker

    def worker_of(self, session: str) -> str:
        row = self.core.sessions.get(session)
        assert row is not None and row.worker is not None, session
        return row.worker

    def row(self, session: str) -> dict[str, Any]:
        row = self.core.sessions.get(session)
        assert row is not None, session
        return row.to_json(self.now)


def of(kind: type[A], actions: Iterable[Action]) -> list[A]:
    return [a for a in actions if isinstance(a, kind)]


def assigned(actions: Iterable[Action]) -> list[tuple[str, str]]:
    """(worker, session) of each ``assign`` sent."""
    from protocol.ipc import Assign

    return [
        (a.worker, a.message.session)
        for a in of(SendToWorker, actions)
        if isinstance(a.message, Assign)
    ]


def session_ends(actions: Iterable[Action]) -> dict[str, str]:
    return {
        a.message.session: a.message.reason
        for a in of(SendSignal, actions)
        if isinstance(a.message, SessionEnd)
    }


def releases(actions: Iterable[Action]) -> list[tuple[str, str]]:
    """(worker, session) of each ``release`` sent."""
    return [
        (a.worker, a.message.session)
        for a in of(SendToWorker, actions)
        if isinstance(a.message, Release)
    ]


def relayed(actions: Iterable[Action]) -> list[tuple[str, str]]:
    return [
        (a.worker, a.message.message)
        for a in of(SendToWorker, actions)
        if isinstance(a.message, Relay)
    ]


def heartbeats(actions: Iterable[Action]) -> list[str]:
    return [a.worker for a in of(SendToWorker, actions) if isinstance(a.message, Heartbeat)]


__all__ = [
    "DEVICE",
    "T0",
    "ForgetWorker",
    "KillProcess",
    "Stage",
    "WatchWorker",
    "assigned",
    "encode_signaling",
    "heartbeats",
    "of",
    "relayed",
    "releases",
    "session_ends",
    "session_id",
]
