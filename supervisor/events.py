"""What goes into the supervisor's core, and what comes out of it.

The core (:mod:`supervisor.core`) is sans-I/O: the shell
(:mod:`supervisor.supervisor`) turns what happens on its sockets, pidfds, the
fork server's pipe and its signals into the *events* below and passes them to
:meth:`~supervisor.core.SupervisorCore.handle` with the time (``now``, seconds on
the monotonic clock); it carries out the *actions* it gets back, in order, and
arms one timer at :meth:`~supervisor.core.SupervisorCore.next_deadline`, where it
calls :meth:`~supervisor.core.SupervisorCore.handle_timer`.

Workers are named by their id (``w-`` + 16 hex digits, PROTOCOL.md §3), which is
also their ZeroMQ routing identity; processes by their pid.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.ice import IceConfig
from protocol.ipc import IpcMessage
from protocol.signaling import SignalingMessage

# -- events: the shell tells the core -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ForkServerUp:
    """The fork server said ``ready`` and got its ``config`` line: workers can be asked for."""

    pid: int


@dataclass(frozen=True, slots=True)
class ForkServerDown:
    """The fork server exited (``code`` as ``returncode``: < 0 is a signal)."""

    code: int | None


@dataclass(frozen=True, slots=True)
class WorkerSpawned:
    """The fork server's ``spawned WORKER_ID PID``."""

    worker: str
    pid: int


@dataclass(frozen=True, slots=True)
class WorkerExitCode:
    """The fork server's ``exited PID CODE``: it reaped a child (may come before
    or after :class:`WorkerGone` for the same process)."""

    pid: int
    code: int


@dataclass(frozen=True, slots=True)
class WorkerGone:
    """The worker's process is gone (its pidfd became readable, or it was gone
    before the pidfd could be opened). The shell reads every message still queued
    on the worker socket first."""

    worker: str


@dataclass(frozen=True, slots=True)
class WorkerFrames:
    """A multipart message received on the worker ROUTER socket, as received."""

    frames: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class SignalReceived:
    """A signaling message arrived on ``device``'s link."""

    device: str
    message: SignalingMessage


@dataclass(frozen=True, slots=True)
class LinkChanged:
    """``device``'s signaling link changed state (``connecting``, ``up``, ``down``, ``closed``)."""

    device: str
    state: str


@dataclass(frozen=True, slots=True)
class LinkRejected:
    """The signaling server refused ``device`` for good (bad token, ...)."""

    device: str
    reason: str


@dataclass(frozen=True, slots=True)
class ControlFrames:
    """A multipart message received on the control ROUTER socket, as received."""

    frames: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Started:
    """Every device's link came up (or is still trying): start-up is over."""


@dataclass(frozen=True, slots=True)
class StopRequested:
    """``tunnelctl stop``, SIGTERM or SIGINT: drain for up to ``drain_timeout`` s, then stop."""

    drain_timeout: float


Event = (
    ForkServerUp
    | ForkServerDown
    | WorkerSpawned
    | WorkerExitCode
    | WorkerGone
    | WorkerFrames
    | SignalReceived
    | LinkChanged
    | LinkRejected
    | ControlFrames
    | Started
    | StopRequested
)

# -- actions: the core asks the shell -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ForkWorker:
    """Ask the fork server for a worker with this id (``spawn WORKER_ID``)."""

    worker: str


@dataclass(frozen=True, slots=True)
class WatchWorker:
    """Watch ``pid`` for exit (a pidfd), then report :class:`WorkerGone`."""

    worker: str
    pid: int


@dataclass(frozen=True, slots=True)
class SendToWorker:
    """Send ``message`` to the worker (dropped if it is gone or not reading)."""

    worker: str
    message: IpcMessage


@dataclass(frozen=True, slots=True)
class KillProcess:
    """SIGKILL (``hard``) or SIGTERM a worker's process; harmless if it is gone."""

    pid: int
    hard: bool


@dataclass(frozen=True, slots=True)
class ForgetWorker:
    """The core is done with this worker: stop watching its pid."""

    worker: str


@dataclass(frozen=True, slots=True)
class SendSignal:
    """Send ``message`` on ``device``'s signaling link, in order (dropped while it is down)."""

    device: str
    message: SignalingMessage


@dataclass(frozen=True, slots=True)
class ReplyControl:
    """Answer a control request: send ``[identity, b"", payload]``."""

    identity: bytes
    payload: bytes


@dataclass(frozen=True, slots=True)
class ConfigureForkServer:
    """Give the fork server the ICE settings of the workers it forks from now on
    (its ``config`` line: so idle workers prepare their offer ahead of time)."""

    ice: IceConfig


@dataclass(frozen=True, slots=True)
class StartForkServer:
    """The fork server died: start a new one (answer with :class:`ForkServerUp`)."""


@dataclass(frozen=True, slots=True)
class Stopping:
    """Shutdown began (tell systemd ``STOPPING=1``)."""

    drain_timeout: float


@dataclass(frozen=True, slots=True)
class Stopped:
    """Every worker is gone (or past its SIGKILL grace): close the links and exit."""


Action = (
    ForkWorker
    | WatchWorker
    | SendToWorker
    | KillProcess
    | ForgetWorker
    | SendSignal
    | ReplyControl
    | ConfigureForkServer
    | StartForkServer
    | Stopping
    | Stopped
)
