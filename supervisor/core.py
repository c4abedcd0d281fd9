"""The supervisor's decisions, sans-I/O: events in, actions and one deadline out.

:class:`SupervisorCore` holds the worker pool (:mod:`supervisor.pool`, whose
:class:`~supervisor.pool.WorkerState` table is the worker lifecycle), the
session table and the restart lineages (:mod:`supervisor.sessions`); what it
does with each worker message, signaling message and control request is in
:mod:`supervisor.worker_messages`, :mod:`supervisor.signal_messages` and
:mod:`supervisor.commands`. The shell
(:mod:`supervisor.supervisor`) owns every socket, pid and signal; it calls
:meth:`SupervisorCore.handle` with each event (:mod:`supervisor.events`) and the
time, carries out the actions returned, in order, and calls
:meth:`SupervisorCore.handle_timer` at :meth:`SupervisorCore.next_deadline`.
This module imports no asyncio, zmq, os, time, subprocess or signal, so every
rule below is tested in memory with a fake clock (``tests/test_supervisor_core.py``).

The rules (ARCHITECTURE.md, "Process model rules"):

* a session request takes an idle worker, or forks one reserved for it (cold
  start); the pool is refilled to ``pool_size`` idle workers;
* a worker's exit ends its sessions: cleanly if it exited with code 0 and the
  supervisor had not killed it (its ``ended`` was lost), else as a crash, which
  the (device, client) lineage's restart policy counts. The exit can be seen
  (pidfd) before the fork server's exit report and the worker's last messages:
  judgement waits up to :data:`EXIT_REPORT_WAIT` for the report;
* a worker that misses heartbeats for ``heartbeat_timeout`` is killed;
* stop drains: busy workers are told to drain within the timeout, then every
  worker gets SIGTERM, then SIGKILL, each after :data:`STOP_GRACE`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

from protocol.backoff import Backoff
from protocol.forkserver import describe_exit
from protocol.ice import IceConfig, IceServer
from protocol.ipc import (
    Drain,
    Heartbeat,
    IceUpdate,
    Relay,
    Release,
    Stop,
    new_worker_id,
)
from protocol.signaling import (
    SessionEnd,
    SignalingMessage,
    encode_signaling,
)
from protocol.supervision import SessionEvent, SessionState
from supervisor.commands import on_control_frames
from supervisor.events import (
    Action,
    ConfigureForkServer,
    ControlFrames,
    Event,
    ForgetWorker,
    ForkServerDown,
    ForkServerUp,
    ForkWorker,
    KillProcess,
    LinkChanged,
    LinkRejected,
    SendSignal,
    SendToWorker,
    SignalReceived,
    Started,
    StartForkServer,
    Stopped,
    Stopping,
    StopRequested,
    WatchWorker,
    WorkerExitCode,
    WorkerFrames,
    WorkerGone,
    WorkerSpawned,
)
from supervisor.pool import Pool, Worker, WorkerEvent, WorkerState
from supervisor.sessions import SessionRow, Sessions
from supervisor.signal_messages import on_signal
from supervisor.worker_messages import assign_message, on_worker_frames

if TYPE_CHECKING:
    from supervisor.config import SupervisorConfig

log = logging.getLogger("tunnelctl.supervisor")

SPAWN_TIMEOUT = 15.0  # fork + hello; generous for a loaded machine
STOP_GRACE = 3.0
EXIT_REPORT_WAIT = 2.0  # for the fork server's "exited PID CODE" after a pidfd fired
MAX_EXIT_CODES = 1024  # exit reports kept for pids whose pidfd has not fired yet


class SupervisorCore:
    """One host's supervision state. Feed it events; it never blocks or sleeps."""

    def __init__(
        self,
        config: SupervisorConfig,
        now: float,
        *,
        pid: int,
        runtime_dir: str,
        rng: random.Random | None = None,
        new_id: Callable[[], str] = new_worker_id,
    ) -> None:
        self.config = config
        self.started = now
        self.pid = pid
        self.runtime_dir = runtime_dir
        self.rng = rng or random.Random()
        self.pool = Pool(config.heartbeat_timeout, new_id)
        self.sessions = Sessions(
            max_restarts=config.max_restarts,
            window=config.restart_window,
            backoff_base=config.backoff_base,
            backoff_cap=config.backoff_cap,
            rng=self.rng,
        )
        self.counters = {
            "bad_worker_messages": 0,
            "bad_control_messages": 0,
            "worker_crashes": 0,
            "workers_hung": 0,
            "sessions_total": 0,
            "fork_server_restarts": 0,
            "heartbeat_misses": 0,
        }
        self.ready = False
        self.stopping = False
        self.stopped = False
        self.fork_server_pid: int | None = None
        self.fork_server_up = False
        self.links: dict[str, str] = {d.id: "down" for d in config.devices}
        self.rejected: dict[str, str] = {}
        # STUN/TURN servers (fresh TURN credentials) from the signaling server.
        self.issued_ice: tuple[IceServer, ...] = ()
        self._exit_codes: dict[int, int] = {}
        self._pool_backoff = Backoff(base=0.5, cap=30.0, rng=self.rng)
        self._pool_retry_at: float | None = None
        self._fork_server_restart_at: float | None = None
        self._next_tick = now + config.heartbeat_interval
        # Shutdown: (phase, deadline, workers waited for); phases drain, term, kill.
        self._stop_phase: str | None = None
        self._stop_deadline = 0.0
        self._stop_waiting: set[str] = set()
        self._out: list[Action] = []

    # -- the interface -------------------------------------------------------------------------

    def handle(self, now: float, event: Event) -> list[Action]:
        """Apply one event; return what the shell must do, in order."""
        if isinstance(event, WorkerFrames):
            on_worker_frames(self, now, event.frames)
        elif isinstance(event, SignalReceived):
            on_signal(self, now, event.device, event.message)
        elif isinstance(event, ControlFrames):
            self._out.extend(on_control_frames(self, now, event.frames))
        elif isinstance(event, WorkerGone):
            self._on_worker_gone(now, event.worker)
        elif isinstance(event, WorkerExitCode):
            self._on_exit_code(now, event.pid, event.code)
        elif isinstance(event, WorkerSpawned):
            self._on_spawned(event.worker, event.pid)
        elif isinstance(event, ForkServerUp):
            self.fork_server_pid, self.fork_server_up = event.pid, True
            self._fork_server_restart_at = None
            self._out.append(ConfigureForkServer(self.ice()))
            self._fill_pool(now)
        elif isinstance(event, ForkServerDown):
            self._on_fork_server_down(now, event.code)
        elif isinstance(event, LinkChanged):
            self._on_link_changed(event.device, event.state)
        elif isinstance(event, LinkRejected):
            self.rejected[event.device] = event.reason
            log.error("device %s: %s", event.device, event.reason)
        elif isinstance(event, Started):
            self.ready = True
        elif isinstance(event, StopRequested):
            self.stop(now, event.drain_timeout)
        self._advance_stop(now)
        return self._flush()

    def handle_timer(self, now: float) -> list[Action]:
        """Do what was due by ``now``: heartbeats, backoffs, spawn and exit deadlines."""
        if now >= self._next_tick:
            self._tick(now)
            self._next_tick = now + self.config.heartbeat_interval
        for worker in self.pool:
            if worker.deadline is not None and now >= worker.deadline:
                if worker.state is WorkerState.GONE:
                    self._judge(now, worker)
                elif worker.starting and worker.kill_reason is None:
                    self._spawn_failed(now, worker, "TimeoutError")
            if worker.kill_at is not None and now >= worker.kill_at and worker.id in self.pool:
                worker.kill_at = None
                self._kill(worker, hard=True)
        for row in self.sessions:
            if (
                row.state is SessionState.STARTING
                and row.give_up_at is not None
                and now >= row.give_up_at
            ):
                self._give_up(now, row)
            if (
                row.state is SessionState.BACKOFF
                and row.start_at is not None
                and now >= row.start_at
            ):
                row.start_at = None
                if not self.stopping:
                    row.move(now, SessionEvent.ELAPSED)
                    self.assign(now, row)
        if self._pool_retry_at is not None and now >= self._pool_retry_at:
            self._pool_retry_at = None
            self._fill_pool(now)
        if self._fork_server_restart_at is not None and now >= self._fork_server_restart_at:
            self._fork_server_restart_at = None
            if not self.stopping:
                self._out.append(StartForkServer())
        self._advance_stop(now)
        return self._flush()

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` wants to be called next (``None``: once stopped)."""
        if self.stopped:
            return None
        times = [self._next_tick, self.sessions.next_start()]
        times += [r.give_up_at for r in self.sessions if r.state is SessionState.STARTING]
        times += [self._pool_retry_at, self._fork_server_restart_at]
        for worker in self.pool:
            times += [worker.deadline, worker.kill_at]
        if self._stop_phase is not None:
            times.append(self._stop_deadline)
        return min((t for t in times if t is not None), default=None)

    # -- the pool ------------------------------------------------------------------------------

    def _fill_pool(self, now: float) -> None:
        if self.stopping:
            return
        for _ in range(self.config.pool_size - self.pool.available()):
            if not self._fork(now, reserved_for=None):
                if not self.fork_server_up:
                    log.warning("%s", _NO_FORK_SERVER)
                return  # else at max_workers: refilled as busy workers exit

    def _fork(self, now: float, *, reserved_for: str | None) -> Worker | None:
        if not self.fork_server_up or self.pool.alive() >= self.config.max_workers:
            return None
        worker = self.pool.add(now, now + SPAWN_TIMEOUT, reserved_for=reserved_for)
        self._out.append(ForkWorker(worker.id))
        return worker

    def _on_spawned(self, worker_id: str, pid: int) -> None:
        worker = self.pool.get(worker_id)
        if worker is None or worker.pid is not None:
            # Given up on before the fork server answered: it must not live on unseen.
            self._out.append(KillProcess(pid, hard=True))
            return
        worker.pid = pid
        for row in self.sessions:
            if row.worker == worker.id:
                row.worker_pid = pid
        self._out.append(WatchWorker(worker.id, pid))

    def _spawn_failed(self, now: float, worker: Worker, why: str) -> None:
        """A worker did not start in time, or its process died before its hello."""
        reason = f"worker did not start: {why}"
        worker.kill_reason, worker.deadline = reason, None
        if worker.state is not WorkerState.GONE:
            if worker.pid is not None:
                self._kill(worker, hard=True)
            else:
                self._forget(worker)
        if worker.reserved_for is not None:
            row = self.sessions.get(worker.reserved_for)
            if row is None or row.state not in (SessionState.STARTING, SessionState.STOPPING):
                return  # given up on meanwhile: its client was told then
            if row.state is SessionState.STARTING:
                row.move(now, SessionEvent.ENDED, reason=reason)
            else:
                row.move(now, SessionEvent.EXITED)  # stopped before it had a worker
            self._out.append(SendSignal(row.device, SessionEnd(session=row.id, reason=reason)))
            return
        if self.stopping:
            return
        delay = self._pool_backoff.next_delay()
        log.warning("%s; retrying in %.1f s", reason, delay)
        self._pool_retry_at = now + delay

    def _on_fork_server_down(self, now: float, code: int | None) -> None:
        self.fork_server_up = False
        if self.stopping:
            return
        log.error("worker fork server exited with %s; restarting it", code)
        self.counters["fork_server_restarts"] += 1
        self._fork_server_restart_at = now + self._pool_backoff.next_delay()

    def _kill(self, worker: Worker, *, hard: bool) -> None:
        if worker.pid is not None:
            self._out.append(KillProcess(worker.pid, hard=hard))

    def _forget(self, worker: Worker) -> None:
        self.pool.remove(worker)
        self._stop_waiting.discard(worker.id)
        self._out.append(ForgetWorker(worker.id))

    # -- exits ---------------------------------------------------------------------------------

    def _on_worker_gone(self, now: float, worker_id: str) -> None:
        worker = self.pool.get(worker_id)
        if worker is None or worker.state is WorkerState.GONE:
            return
        before = worker.move(WorkerEvent.EXIT)
        if self.sessions.of_worker(worker.id):
            worker.deadline = now + EXIT_REPORT_WAIT
            if worker.pid in self._exit_codes:
                self._judge(now, worker)
            return
        code = self._exit_codes.get(worker.pid or -1)
        how = "exited" if code is None else describe_exit(code)
        if before in (WorkerState.SPAWNING, WorkerState.RESERVED, WorkerState.IDLE):
            if not self.stopping:
                log.warning("idle worker %s (pid %s) %s", worker.id, worker.pid, how)
            if before is WorkerState.RESERVED and worker.kill_reason is None:
                self._spawn_failed(now, worker, how)
        self._forget(worker)
        self._fill_pool(now)

    def _on_exit_code(self, now: float, pid: int, code: int) -> None:
        self._exit_codes[pid] = code
        if len(self._exit_codes) > MAX_EXIT_CODES:
            self._exit_codes.pop(next(iter(self._exit_codes)))
        worker = self.pool.by_pid(pid)
        if worker is not None and worker.state is WorkerState.GONE:
            self._judge(now, worker)

    def _judge(self, now: float, worker: Worker) -> None:
        """Crash or clean end, for each session still live on an exited worker."""
        code = self._exit_codes.get(worker.pid) if worker.pid is not None else None
        self._forget(worker)
        for row in self.sessions.of_worker(worker.id):
            if code == 0 and worker.kill_reason is None:
                # It finished normally; its "ended" was lost on the way.
                row.move(now, SessionEvent.ENDED, reason=row.reason or "worker exited")
                continue
            how = "exited" if code is None else describe_exit(code)
            reason = worker.kill_reason or f"worker crashed ({how})"
            stopping = row.state is SessionState.STOPPING
            row.move(now, SessionEvent.CRASHED, reason=reason)
            if not stopping:
                self.counters["worker_crashes"] += 1
                self.sessions.lineage(row.device, row.client).record_crash(now)
                log.warning("session %s: %s", row.id, reason)
                self._out.append(
                    SendSignal(
                        row.device, SessionEnd(session=row.id, reason=f"{reason}; reconnect")
                    )
                )
        self._fill_pool(now)

    # -- sessions ------------------------------------------------------------------------------

    def ice(self) -> IceConfig:
        """The ICE settings of new sessions: ours, then the signaling server's servers."""
        return IceConfig(
            self.config.ice_servers + self.issued_ice, self.config.ice_hosts, self.config.ice_policy
        )

    def assign(self, now: float, row: SessionRow) -> None:
        row.give_up_at = now + self.config.negotiation_timeout
        worker = self.pool.take_idle()
        if worker is None:
            log.info("session %s: no idle worker, forking one (cold start)", row.id)
            if self._fork(now, reserved_for=row.id) is None:
                reason = _NO_FORK_SERVER
                if self.fork_server_up:
                    reason = f"device is busy: {self.config.max_workers} worker processes"
                row.move(now, SessionEvent.ENDED, reason=reason)
                self._out.append(SendSignal(row.device, SessionEnd(session=row.id, reason=reason)))
            self._fill_pool(now)
            return
        self._fill_pool(now)
        self.bind(now, row, worker)

    def bind(self, now: float, row: SessionRow | None, worker: Worker) -> None:
        """Give a busy worker its session: assign, then what signaling waited for it."""
        if row is None or row.state is not SessionState.STARTING:  # the client left meanwhile
            if row is not None and row.state is SessionState.STOPPING:
                row.move(now, SessionEvent.EXITED)
            self._kill(worker, hard=False)
            return
        worker.session, row.worker, row.worker_pid = row.id, worker.id, worker.pid
        self._out.append(SendToWorker(worker.id, assign_message(self, row)))
        pending, row.pending = row.pending, []
        for message in pending:
            self.relay(worker.id, row.id, message)

    def stop_worker(self, now: float, row: SessionRow, reason: str) -> None:
        """Tell the row's worker, if it has one, to end; SIGKILL it after the grace."""
        worker = self.pool.get(row.worker) if row.worker is not None else None
        if worker is not None:
            self._out.append(SendToWorker(worker.id, Stop(reason=reason)))
            worker.kill_at = now + STOP_GRACE

    def _give_up(self, now: float, row: SessionRow) -> None:
        """A negotiation not done in time (an offer nobody answers holds a worker).

        The session ends at once and its client is told, here and only here; its
        worker is asked to ``release`` it and come back to the pool with a fresh
        offer (``released``), so a client that never answers costs no fork.
        """
        reason = f"negotiation not done in {self.config.negotiation_timeout:g} s; given up"
        log.info("session %s (client %s): %s", row.id, row.client, reason)
        row.give_up_at = None
        row.move(now, SessionEvent.ENDED, reason=reason)
        self._out.append(SendSignal(row.device, SessionEnd(session=row.id, reason=reason)))
        cold = self.pool.reserved_for(row.id)
        if cold is not None:  # forked for it, not started yet: a pool worker from now on
            cold.move(WorkerEvent.RELEASED)
            cold.reserved_for = None
            return
        worker = self.pool.get(row.worker) if row.worker is not None else None
        if worker is None or worker.state is not WorkerState.BUSY:
            return
        worker.releasing, worker.kill_at = row.id, now + STOP_GRACE
        self._out.append(SendToWorker(worker.id, Release(session=row.id, reason=reason)))

    def released(self, now: float, worker: Worker) -> None:
        """``worker`` dropped its given-up session: it is idle again, as after hello."""
        worker.move(WorkerEvent.RELEASED)
        worker.session = worker.releasing = worker.kill_at = None
        if self.stopping:
            self._kill(worker, hard=False)
            return
        log.info("worker %s (pid %s) back in the pool", worker.id, worker.pid)
        if self.issued_ice:  # settings sent while it was busy did not reach it
            self._out.append(SendToWorker(worker.id, IceUpdate.of(self.ice())))

    # -- periodic work -------------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        for worker in self.pool:
            if worker.starting or worker.state is WorkerState.GONE:
                continue
            # Silent for two intervals: a stalled event loop, before it counts as hung.
            if now - worker.hb.last > 2 * self.config.heartbeat_interval and not worker.kill_reason:
                self.counters["heartbeat_misses"] += 1
            if worker.hb.expired(now) and worker.kill_reason is None:
                worker.kill_reason = (
                    f"worker hung: no heartbeat for {self.config.heartbeat_timeout:g} s; killed"
                )
                self.counters["workers_hung"] += 1
                log.error("worker %s (pid %s): %s", worker.id, worker.pid, worker.kill_reason)
                self._kill(worker, hard=True)
                continue
            self._out.append(SendToWorker(worker.id, Heartbeat()))
        self.sessions.prune(now)

    # -- shutdown ------------------------------------------------------------------------------

    def stop(self, now: float, drain_timeout: float) -> None:
        if self.stopping:
            return
        log.info("stopping: draining sessions for up to %.1f s", drain_timeout)
        self.stopping = True
        self._out.append(Stopping(drain_timeout))
        self._pool_retry_at = self._fork_server_restart_at = None
        for row in self.sessions:
            if row.state in (SessionState.BACKOFF, SessionState.STARTING, SessionState.RUNNING):
                row.move(now, SessionEvent.STOP, reason="supervisor stopping")
                row.start_at = None
        busy = [w for w in self.pool if w.state is WorkerState.BUSY]
        for worker in busy:
            message = Drain(timeout=drain_timeout) if drain_timeout > 0 else None
            self._out.append(SendToWorker(worker.id, message or Stop("supervisor stopping")))
        self._stop_phase = "drain"
        self._stop_deadline = now + drain_timeout + STOP_GRACE
        self._stop_waiting = {w.id for w in busy}

    def _advance_stop(self, now: float) -> None:
        while self._stop_phase is not None and (
            not (self._stop_waiting & {w.id for w in self.pool}) or now >= self._stop_deadline
        ):
            if self._stop_phase == "kill":
                self._stop_phase = None
                self.stopped = True
                for row in self.sessions:  # past SIGKILL: whatever is left is gone
                    if row.state is SessionState.STOPPING:
                        row.move(now, SessionEvent.EXITED)
                self._out.append(Stopped())
                return
            self._stop_phase = "term" if self._stop_phase == "drain" else "kill"
            for worker in self.pool:
                self._kill(worker, hard=self._stop_phase == "kill")
            self._stop_deadline = now + STOP_GRACE
            self._stop_waiting = {w.id for w in self.pool}

    # -- helpers -------------------------------------------------------------------------------

    def _on_link_changed(self, device: str, state: str) -> None:
        self.links[device] = state
        if state == "down":
            busy = sum(1 for r in self.sessions if r.device == device and r.worker)
            log.warning("device %s: signaling link down; %d session(s) keep running", device, busy)
        elif state == "up":
            log.info("device %s: registered", device)

    def emit(self, action: Action) -> None:
        self._out.append(action)

    def pool_worker_ready(self) -> None:
        """A pool worker said hello: forking works again."""
        self._pool_backoff.reset()

    def relay(self, worker: str, session: str, message: SignalingMessage) -> None:
        self._out.append(
            SendToWorker(worker, Relay(session=session, message=encode_signaling(message)))
        )

    def _flush(self) -> list[Action]:
        out, self._out = self._out, []
        return out


_NO_FORK_SERVER = "the worker fork server is not running"
