"""The supervisor process: device links, one worker process per session.

It holds one signaling link per hosted device, hands each session request to
an idle worker (forked from :mod:`workers.zygote`; this module never imports
``workers`` or aiortc, it starts the zygote by module path), relays the
session's signaling between the link and the worker (PROTOCOL.md §3), and keeps
the table of sessions that ``tunnelctl status|sessions`` show (§4).

Liveness: a worker's exit is seen at once (a pidfd per worker becomes
readable); a wedged worker misses heartbeats and is killed. A worker that
crashes takes only its own session down: the client is told (``session_end``),
asks again, and the new session starts under the restart policy of its
(device, client) lineage (:mod:`protocol.supervision`): at once, after a
jittered backoff, or refused as FATAL past the crash intensity.

Shutdown (``tunnelctl stop``, SIGTERM, SIGINT) drains: new sessions are
refused, busy workers are told to drain their streams within the timeout, then
SIGTERM, then SIGKILL; nothing is respawned while stopping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from protocol.backoff import Backoff
from protocol.errors import LocalProtocolError, SignalingError
from protocol.ice import IceConfig, IceServer
from protocol.ipc import (
    Assign,
    ControlReply,
    ControlRequest,
    Drain,
    Ended,
    Heartbeat,
    Hello,
    IceUpdate,
    IpcError,
    IpcMessage,
    Relay,
    StateReport,
    Stop,
    decode_control_request,
    decode_ipc,
    encode_control_reply,
    encode_ipc,
    new_worker_id,
)
from protocol.signaling import (
    Answer,
    Candidate,
    Error,
    IceServers,
    Offer,
    PeerLeft,
    SessionEnd,
    SessionRequest,
    SignalingMessage,
    decode_signaling,
    encode_signaling,
)
from protocol.supervision import (
    HeartbeatMonitor,
    Refuse,
    RestartPolicy,
    SessionEvent,
    SessionState,
    StartAfter,
    transition,
)
from signaling.errors import LinkDown, LinkRejected
from signaling.link import LinkState, SignalingLink
from supervisor.config import DeviceConfig, SupervisorConfig
from supervisor.errors import SupervisorError
from supervisor.notify import sd_notify
from supervisor.runtime import (
    CONTROL_SOCKET,
    WORKERS_SOCKET,
    RuntimeLock,
    ipc_endpoint,
    prepare_runtime_dir,
)

log = logging.getLogger("tunnelctl.supervisor")

HWM = 1000
SPAWN_TIMEOUT = 15.0  # fork + hello; generous for a loaded machine
STOP_GRACE = 3.0
EXIT_REPORT_WAIT = 2.0  # for the fork server's "exited PID CODE" after a pidfd fired
RETAIN_EXITED = 120.0  # seconds an ended session stays visible in `sessions`
MAX_EXITED_ROWS = 200
MAX_PENDING_SIGNALS = 64


@dataclass(eq=False)
class WorkerProc:
    id: str
    hb: HeartbeatMonitor
    pid: int | None = None
    state: str = "spawning"  # spawning, idle, busy, exiting
    session: str | None = None
    pidfd: int | None = None
    hello: asyncio.Event = field(default_factory=asyncio.Event)
    kill_reason: str | None = None
    reserved: bool = False  # forked for one waiting session, never offered to another
    exited: bool = False  # the process is gone; late messages are still read


@dataclass(eq=False)
class SessionRow:
    id: str
    device: str
    client: str
    state: SessionState
    created: float
    restarts: int = 0
    worker: WorkerProc | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    streams: int = 0
    path: str | None = None
    pair: str | None = None
    relay_transport: str | None = None
    reason: str | None = None
    crashed: bool = False
    ended_at: float | None = None
    pending: list[SignalingMessage] = field(default_factory=list)

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "device": self.device,
            "client": self.client,
            "state": self.state.value,
            "worker_pid": self.worker.pid if self.worker else None,
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


@dataclass(eq=False)
class Device:
    config: DeviceConfig
    link: SignalingLink
    rejected: str | None = None


class Supervisor:
    """One host's supervisor: run it with :meth:`run`, stop it with :meth:`request_stop`."""

    def __init__(
        self,
        config: SupervisorConfig,
        runtime_dir: Path,
        *,
        on_ready: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.runtime_dir = runtime_dir
        self.on_ready = on_ready
        self.started = time.monotonic()
        self.stopping = False
        self.ready = False
        self.workers: dict[str, WorkerProc] = {}
        self.sessions: dict[str, SessionRow] = {}
        self.lineages: dict[tuple[str, str], RestartPolicy] = {}
        self.devices: dict[str, Device] = {}
        self.counters = {
            "bad_worker_messages": 0,
            "bad_control_messages": 0,
            "worker_crashes": 0,
            "workers_hung": 0,
            "sessions_total": 0,
        }
        self._exit_codes: dict[int, int] = {}
        self._exit_waiters: dict[int, asyncio.Future[int]] = {}
        self._stop_requested: asyncio.Future[float] | None = None
        self._inbox: asyncio.Queue[tuple[str, SignalingMessage]] = asyncio.Queue(maxsize=4096)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pool_backoff = Backoff(base=0.5, cap=30.0)
        self._zygote: asyncio.subprocess.Process | None = None
        self._zygote_ready: asyncio.Future[int] | None = None
        self._spawned: dict[str, asyncio.Future[int]] = {}
        self.ctx: zmq.asyncio.Context | None = None
        self._gone_events: dict[str, asyncio.Event] = {}
        self._outboxes: dict[str, asyncio.Queue[SignalingMessage]] = {}
        # STUN/TURN servers (fresh TURN credentials) from the signaling server.
        self._issued_ice: tuple[IceServer, ...] = ()

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until asked to stop; raise :class:`SupervisorError` if start-up fails."""
        loop = asyncio.get_running_loop()
        self._stop_requested = loop.create_future()
        prepare_runtime_dir(self.runtime_dir)
        lock = RuntimeLock(self.runtime_dir)
        lock.acquire()
        try:
            self._bind()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop, self.config.drain_timeout)
            try:
                await self._start()
                drain_timeout = await self._stop_requested
            finally:
                await self._shutdown(self._drain_timeout_or(self.config.drain_timeout))
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
        finally:
            self._unbind()
            lock.release()
        log.info("supervisor stopped (drain timeout was %.1f s)", drain_timeout)

    def request_stop(self, drain_timeout: float) -> None:
        if self._stop_requested is not None and not self._stop_requested.done():
            log.info("stopping: draining sessions for up to %.1f s", drain_timeout)
            self._stop_requested.set_result(drain_timeout)

    def _drain_timeout_or(self, default: float) -> float:
        fut = self._stop_requested
        if fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None:
            return fut.result()
        return default

    def _bind(self) -> None:
        self.ctx = zmq.asyncio.Context()
        self.workers_sock = self.ctx.socket(zmq.ROUTER)
        self.control_sock = self.ctx.socket(zmq.ROUTER)
        for sock in (self.workers_sock, self.control_sock):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, HWM)
            sock.setsockopt(zmq.RCVHWM, HWM)
            sock.setsockopt(zmq.MAXMSGSIZE, 262144 + 64)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A blocking twin of the worker socket, to empty it when a worker exits.
        self._workers_sync: zmq.Socket[bytes] = zmq.Socket.shadow(self.workers_sock.underlying)
        old_umask = os.umask(0o077)  # socket files private even inside the private dir
        try:
            for sock, name in (
                (self.workers_sock, WORKERS_SOCKET),
                (self.control_sock, CONTROL_SOCKET),
            ):
                with contextlib.suppress(FileNotFoundError):
                    (self.runtime_dir / name).unlink()  # stale, from a supervisor that died
                sock.bind(ipc_endpoint(self.runtime_dir, name))
        finally:
            os.umask(old_umask)

    def _unbind(self) -> None:
        if self.ctx is None:
            return
        self.workers_sock.close(linger=0)
        self.control_sock.close(linger=0)
        self.ctx.term()
        for name in (WORKERS_SOCKET, CONTROL_SOCKET):
            with contextlib.suppress(FileNotFoundError):
                (self.runtime_dir / name).unlink()

    async def _start(self) -> None:
        self._spawn_task(self._worker_loop(), "worker-messages")
        self._spawn_task(self._control_loop(), "control")
        self._spawn_task(self._signal_loop(), "signals")
        await self._start_zygote()
        self._spawn_task(self._tick_loop(), "ticks")
        self._fill_pool()
        for device_config in self.config.devices:
            self._add_device(device_config)
        results = await asyncio.gather(
            *(self._wait_registered(d) for d in self.devices.values()), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        names = ",".join(self.devices)
        self.ready = True
        if self.on_ready is not None:
            self.on_ready(f"ready pid={os.getpid()} devices={names} runtime={self.runtime_dir}")
        sd_notify(f"READY=1\nSTATUS=serving {names}")

    async def _wait_registered(self, device: Device) -> None:
        try:
            await device.link.wait_up(30.0)
        except LinkRejected as exc:
            raise SupervisorError(f"device {device.config.id}: {exc}") from None
        except LinkDown as exc:
            # The signaling server may come later; the link keeps trying.
            log.warning("device %s: %s; still trying", device.config.id, exc)
            return
        if self.on_ready is not None:
            services = " ".join(f"{s.name}={s.host}:{s.port}" for s in device.config.services)
            self.on_ready(f"registered {device.config.id} {services}")

    def _add_device(self, config: DeviceConfig) -> None:
        def on_message(message: SignalingMessage) -> None:
            try:
                self._inbox.put_nowait((config.id, message))
            except asyncio.QueueFull:
                log.warning("device %s: signaling inbox full, message dropped", config.id)

        def on_state(state: LinkState) -> None:
            if state is LinkState.DOWN:
                busy = sum(1 for r in self.sessions.values() if r.device == config.id and r.worker)
                log.warning(
                    "device %s: signaling link down; %d session(s) keep running", config.id, busy
                )
            elif state is LinkState.UP:
                log.info("device %s: registered", config.id)

        link = SignalingLink(
            self.config.signal_url, config.token, on_message, device=config.id, on_state=on_state
        )
        device = Device(config, link)
        self.devices[config.id] = device
        link.start()
        self._spawn_task(self._watch_link(device), f"link {config.id}")
        outbox: asyncio.Queue[SignalingMessage] = asyncio.Queue(maxsize=4096)
        self._outboxes[config.id] = outbox
        self._spawn_task(self._outbox_loop(device, outbox), f"outbox {config.id}")

    async def _watch_link(self, device: Device) -> None:
        try:
            await device.link.run_until_closed()
        except LinkRejected as exc:
            device.rejected = str(exc)
            log.error("device %s: %s", device.config.id, exc)

    async def _shutdown(self, drain_timeout: float) -> None:
        self.stopping = True
        sd_notify("STOPPING=1")
        now = time.monotonic()
        for row in list(self.sessions.values()):
            if row.state in (SessionState.BACKOFF, SessionState.STARTING, SessionState.RUNNING):
                self._transition(row, SessionEvent.STOP, reason="supervisor stopping")
        busy = [w for w in self.workers.values() if w.state == "busy"]
        for worker in busy:
            if drain_timeout > 0:
                await self._send(worker, Drain(timeout=drain_timeout))
            else:
                await self._send(worker, Stop(reason="supervisor stopping"))
        deadline = now + drain_timeout + STOP_GRACE
        await self._wait_workers_gone(busy, deadline)
        for worker in list(self.workers.values()):
            self._signal_worker(worker, signal.SIGTERM)
        await self._wait_workers_gone(list(self.workers.values()), time.monotonic() + STOP_GRACE)
        for worker in list(self.workers.values()):
            self._signal_worker(worker, signal.SIGKILL)
        await self._wait_workers_gone(list(self.workers.values()), time.monotonic() + STOP_GRACE)
        await self._stop_zygote()
        for device in self.devices.values():
            await device.link.close()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _wait_workers_gone(self, workers: list[WorkerProc], deadline: float) -> None:
        while any(w.id in self.workers for w in workers):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            gone = [self._worker_gone_event(w) for w in workers if w.id in self.workers]
            await asyncio.wait(
                [asyncio.ensure_future(e.wait()) for e in gone],
                timeout=remaining,
                return_when=asyncio.FIRST_COMPLETED,
            )

    def _worker_gone_event(self, worker: WorkerProc) -> asyncio.Event:
        event = self._gone_events.get(worker.id)
        if event is None:
            event = self._gone_events[worker.id] = asyncio.Event()
        return event

    # -- the zygote and the pool -------------------------------------------------------------

    async def _start_zygote(self) -> None:
        loop = asyncio.get_running_loop()
        self._zygote_ready = loop.create_future()
        self._zygote = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "workers.zygote",
            "--endpoint",
            ipc_endpoint(self.runtime_dir, WORKERS_SOCKET),
            "--supervisor-pid",
            str(os.getpid()),
            "--heartbeat-interval",
            str(self.config.heartbeat_interval),
            "--heartbeat-timeout",
            str(self.config.heartbeat_timeout),
            "--keepalive",
            str(self.config.keepalive),
            "--log-level",  # workers log as verbosely as the supervisor (-v)
            str(logging.getLogger("tunnelctl").getEffectiveLevel()),
            "--stack-log-level",  # and aiortc/aioice too (-vv)
            str(logging.getLogger("aioice").getEffectiveLevel()),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,  # a terminal's Ctrl-C is the supervisor's alone
            # Only the supervisor talks to systemd (NotifyAccess=main).
            env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"},
        )
        self._spawn_task(self._zygote_reader(self._zygote), "zygote")
        try:
            pid = await asyncio.wait_for(asyncio.shield(self._zygote_ready), SPAWN_TIMEOUT)
        except TimeoutError:
            raise SupervisorError("the worker fork server did not start") from None
        log.info("worker fork server ready (pid %d)", pid)
        self._configure_zygote()

    def _ice(self) -> IceConfig:
        """The ICE settings of new sessions: ours, then the signaling server's servers."""
        return IceConfig(
            self.config.ice_servers + self._issued_ice,
            self.config.ice_hosts,
            self.config.ice_policy,
        )

    def _configure_zygote(self) -> None:
        """Give the fork server the ICE settings of the workers it forks from now on.

        So idle workers prepare their offer ahead of time; on stdin, since TURN
        credentials must not show in `ps`.
        """
        zygote = self._zygote
        if zygote is None or zygote.stdin is None or zygote.returncode is not None:
            return
        ice = self._ice()
        config = {
            "ice_servers": [
                {"url": s.url, "username": s.username, "credential": s.credential}
                for s in ice.servers
            ],
            "ice_hosts": list(ice.hosts),
            "ice_policy": ice.policy,
        }
        zygote.stdin.write(b"config " + json.dumps(config).encode() + b"\n")

    async def _ice_servers_issued(self, device_id: str, message: IceServers) -> None:
        """Fresh servers from signaling: fork with them, and idle workers prepare again."""
        if message.ice_servers == self._issued_ice:
            return
        self._issued_ice = message.ice_servers
        expiry = f", credentials valid {message.ttl} s" if message.ttl else ""
        log.info(
            "device %s: %d ICE server(s) from the signaling server%s",
            device_id,
            len(message.ice_servers),
            expiry,
        )
        self._configure_zygote()
        update = IceUpdate.of(self._ice())
        for worker in list(self.workers.values()):
            if worker.state == "idle" and worker.session is None and not worker.exited:
                await self._send(worker, update)

    async def _stop_zygote(self) -> None:
        zygote = self._zygote
        if zygote is None or zygote.returncode is not None:
            return
        assert zygote.stdin is not None
        zygote.stdin.close()
        try:
            await asyncio.wait_for(zygote.wait(), STOP_GRACE)
        except TimeoutError:
            zygote.kill()
            await zygote.wait()

    async def _zygote_reader(self, zygote: asyncio.subprocess.Process) -> None:
        assert zygote.stdout is not None
        while True:
            raw = await zygote.stdout.readline()
            if not raw:
                break
            verb, _, rest = raw.decode("ascii", "replace").strip().partition(" ")
            args = rest.split()
            if verb == "ready" and self._zygote_ready and not self._zygote_ready.done():
                self._zygote_ready.set_result(int(args[0]))
            elif verb == "spawned" and len(args) == 2:
                waiter = self._spawned.pop(args[0], None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(int(args[1]))
            elif verb == "exited" and len(args) == 2:
                pid, code = int(args[0]), int(args[1])
                self._exit_codes[pid] = code
                waiter = self._exit_waiters.get(pid)
                if waiter is not None and not waiter.done():
                    waiter.set_result(code)
                if len(self._exit_codes) > 1024:
                    self._exit_codes.pop(next(iter(self._exit_codes)))
            else:
                log.warning("fork server: %s", raw.decode("ascii", "replace").strip())
        code = await zygote.wait()
        if self._zygote_ready and not self._zygote_ready.done():
            self._zygote_ready.set_exception(SupervisorError(f"fork server exited with {code}"))
        if not self.stopping:
            log.error("worker fork server exited with %s; restarting it", code)
            await asyncio.sleep(self._pool_backoff.next_delay())
            if not self.stopping:
                await self._start_zygote()
                self._fill_pool()

    def _new_worker(self, *, reserved: bool) -> WorkerProc:
        """Ask the fork server for a worker; it is registered at once, so counts are exact."""
        zygote = self._zygote
        if zygote is None or zygote.stdin is None or zygote.returncode is not None:
            raise SupervisorError("the worker fork server is not running")
        worker = WorkerProc(
            id=new_worker_id(),
            hb=HeartbeatMonitor(self.config.heartbeat_timeout, time.monotonic()),
            reserved=reserved,
        )
        self.workers[worker.id] = worker
        self._spawned[worker.id] = asyncio.get_running_loop().create_future()
        zygote.stdin.write(f"spawn {worker.id}\n".encode())
        return worker

    async def _spawn_worker(self, worker: WorkerProc) -> WorkerProc:
        """Wait until the fork server reports ``worker``'s pid and the worker says hello."""
        zygote = self._zygote
        spawned = self._spawned[worker.id]
        try:
            if zygote is not None and zygote.stdin is not None:
                await zygote.stdin.drain()
            worker.pid = await asyncio.wait_for(spawned, SPAWN_TIMEOUT)
            self._watch_exit(worker)
            await asyncio.wait_for(worker.hello.wait(), SPAWN_TIMEOUT)
        except (TimeoutError, ConnectionError) as exc:
            self._spawned.pop(worker.id, None)
            self._signal_worker(worker, signal.SIGKILL)
            if worker.pid is None:
                self._forget_worker(worker)
            raise SupervisorError(f"worker did not start: {type(exc).__name__}") from None
        return worker

    def _fill_pool(self) -> None:
        if self.stopping:
            return
        idle = sum(
            1
            for w in self.workers.values()
            if w.state in ("spawning", "idle") and not w.session and not w.reserved
        )
        for _ in range(self.config.pool_size - idle):
            try:
                worker = self._new_worker(reserved=False)
            except SupervisorError as exc:
                log.warning("%s", exc)
                return
            self._spawn_task(self._add_idle_worker(worker), "pool")

    async def _add_idle_worker(self, worker: WorkerProc) -> None:
        try:
            await self._spawn_worker(worker)
        except SupervisorError as exc:
            if self.stopping:
                return
            delay = self._pool_backoff.next_delay()
            log.warning("%s; retrying in %.1f s", exc, delay)
            await asyncio.sleep(delay)
            self._fill_pool()
        else:
            self._pool_backoff.reset()

    def _watch_exit(self, worker: WorkerProc) -> None:
        assert worker.pid is not None
        try:
            worker.pidfd = os.pidfd_open(worker.pid)
        except ProcessLookupError:
            asyncio.get_running_loop().call_soon(self._on_worker_exit, worker)
            return
        asyncio.get_running_loop().add_reader(worker.pidfd, self._on_worker_exit, worker)

    def _signal_worker(self, worker: WorkerProc, sig: int) -> None:
        if worker.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, sig)

    def _forget_worker(self, worker: WorkerProc) -> None:
        self.workers.pop(worker.id, None)
        if worker.pidfd is not None:
            asyncio.get_running_loop().remove_reader(worker.pidfd)
            os.close(worker.pidfd)
            worker.pidfd = None
        self._worker_gone_event(worker).set()
        self._gone_events.pop(worker.id, None)

    def _on_worker_exit(self, worker: WorkerProc) -> None:
        if worker.id not in self.workers or worker.exited:
            return
        worker.exited = True
        if worker.pidfd is not None:
            asyncio.get_running_loop().remove_reader(worker.pidfd)
        if not self._live_rows(worker):
            self._drain_worker_messages()
            code = self._exit_codes.get(worker.pid or -1)
            if worker.state in ("spawning", "idle") and not self.stopping:
                how = "exited" if code is None else _describe_exit(code)
                log.warning("idle worker %s (pid %s) %s", worker.id, worker.pid, how)
            self._forget_worker(worker)
            self._fill_pool()
            return
        self._spawn_task(self._judge_exit(worker), f"exit of {worker.id}")

    def _live_rows(self, worker: WorkerProc) -> list[SessionRow]:
        live = (SessionState.STARTING, SessionState.RUNNING, SessionState.STOPPING)
        return [r for r in self.sessions.values() if r.worker is worker and r.state in live]

    async def _judge_exit(self, worker: WorkerProc) -> None:
        """Crash or clean end? The pidfd can fire before the worker's last message
        ("ended") and the fork server's exit report arrive: wait briefly for both."""
        pid = worker.pid or -1
        waiter = self._exit_waiters.setdefault(pid, asyncio.get_running_loop().create_future())
        if pid in self._exit_codes and not waiter.done():
            waiter.set_result(self._exit_codes[pid])
        try:
            code: int | None = await asyncio.wait_for(asyncio.shield(waiter), EXIT_REPORT_WAIT)
        except TimeoutError:
            code = None
        finally:
            self._exit_waiters.pop(pid, None)
        self._drain_worker_messages()
        self._forget_worker(worker)
        for row in self._live_rows(worker):
            if code == 0 and worker.kill_reason is None:
                # It finished normally; its "ended" was lost on the way.
                self._transition(row, SessionEvent.ENDED, reason=row.reason or "worker exited")
                continue
            how = "exited" if code is None else _describe_exit(code)
            reason = worker.kill_reason or f"worker crashed ({how})"
            stopping = row.state is SessionState.STOPPING
            self._transition(row, SessionEvent.CRASHED, reason=reason)
            if not stopping:
                row.crashed = True
                self.counters["worker_crashes"] += 1
                self._lineage(row.device, row.client).record_crash(time.monotonic())
                log.warning("session %s: %s", row.id, reason)
                self._queue_signal(
                    row.device, SessionEnd(session=row.id, reason=f"{reason}; reconnect")
                )
        self._fill_pool()

    def _drain_worker_messages(self) -> None:
        for _ in range(HWM):
            try:
                frames = self._workers_sync.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.ZMQError:  # zmq.Again included: nothing left
                return
            self._on_worker_frames(frames)

    # -- worker messages ---------------------------------------------------------------------

    async def _worker_loop(self) -> None:
        while True:
            frames = await self.workers_sock.recv_multipart()
            self._on_worker_frames(frames)

    def _on_worker_frames(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self._bad_worker("wrong number of frames")
            return
        identity, payload = frames
        worker = self.workers.get(identity.decode("ascii", "replace"))
        if worker is None:
            self._bad_worker("message from an unknown worker identity")
            return
        try:
            message = decode_ipc(payload)
        except IpcError as exc:
            self._bad_worker(f"worker {worker.id}: {exc}")
            return
        worker.hb.beat(time.monotonic())
        self._handle_worker(worker, message)

    def _bad_worker(self, why: str) -> None:
        self.counters["bad_worker_messages"] += 1
        count = self.counters["bad_worker_messages"]
        if count <= 10 or count % 1000 == 0:  # logged, but a flood cannot fill the disk
            log.warning("bad message on the worker socket (%d so far): %s", count, why)

    def _handle_worker(self, worker: WorkerProc, message: IpcMessage) -> None:
        row = self.sessions.get(worker.session) if worker.session else None
        if isinstance(message, Hello):
            if message.worker != worker.id or (
                worker.pid is not None and message.pid != worker.pid
            ):
                self._bad_worker(f"worker {worker.id}: hello with wrong identity")
                return
            if worker.state == "spawning":
                worker.state = "busy" if worker.reserved else "idle"
            worker.hello.set()
            if self._issued_ice and worker.state == "idle":
                # Forked before the latest servers arrived? It ignores equal settings.
                self._spawn_task(self._send(worker, IceUpdate.of(self._ice())), "ice update")
        elif isinstance(message, Heartbeat):
            if row is not None:
                row.bytes_in, row.bytes_out = message.bytes_in, message.bytes_out
                row.streams = message.streams
        elif isinstance(message, Relay):
            if row is None or message.session != row.id:
                self._bad_worker(f"worker {worker.id}: relay for a session it does not own")
                return
            try:
                signal_message = decode_signaling(message.message)
            except SignalingError as exc:
                self._bad_worker(f"worker {worker.id}: bad relayed message: {exc}")
                return
            if (
                not isinstance(signal_message, (Offer, Candidate, SessionEnd))
                or getattr(signal_message, "session", None) != row.id
            ):
                self._bad_worker(
                    f"worker {worker.id}: may not send {type(signal_message).__name__}"
                )
                return
            self._queue_signal(row.device, signal_message)
        elif isinstance(message, StateReport):
            if row is None or message.session != row.id:
                self._bad_worker(f"worker {worker.id}: state for a session it does not own")
                return
            if message.state == "connected" and row.state is SessionState.STARTING:
                row.path, row.pair = message.path, message.pair
                row.relay_transport = message.relay_transport
                self._transition(row, SessionEvent.CONNECTED)
                log.info(
                    "session %s: running (%s path, %s, client %s)",
                    row.id,
                    row.path,
                    row.pair,
                    row.client,
                )
        elif isinstance(message, Ended):
            if row is None or message.session != row.id:
                self._bad_worker(f"worker {worker.id}: ended for a session it does not own")
                return
            worker.state = "exiting"
            if row.state in (SessionState.STARTING, SessionState.RUNNING, SessionState.STOPPING):
                self._transition(row, SessionEvent.ENDED, reason=message.reason)
            log.info("session %s ended: %s", row.id, message.reason)
        else:
            self._bad_worker(f"worker {worker.id}: unexpected {type(message).__name__}")

    async def _send(self, worker: WorkerProc, message: IpcMessage) -> None:
        try:
            await self.workers_sock.send_multipart([worker.id.encode(), encode_ipc(message)])
        except zmq.ZMQError as exc:  # EHOSTUNREACH under ROUTER_MANDATORY: it is gone
            log.debug("cannot send to worker %s: %s", worker.id, exc)

    # -- signaling ---------------------------------------------------------------------------

    async def _signal_loop(self) -> None:
        while True:
            device_id, message = await self._inbox.get()
            try:
                await self._on_signal(device_id, message)
            except (LocalProtocolError, SupervisorError) as exc:
                log.error("device %s: %s", device_id, exc)

    def _queue_signal(self, device_id: str, message: SignalingMessage) -> None:
        """Send on the device's link, in order, without waiting (LinkDown: dropped)."""
        outbox = self._outboxes.get(device_id)
        if outbox is None:
            return
        try:
            outbox.put_nowait(message)
        except asyncio.QueueFull:
            log.warning("device %s: signaling outbox full, message dropped", device_id)

    async def _outbox_loop(self, device: Device, outbox: asyncio.Queue[SignalingMessage]) -> None:
        while True:
            message = await outbox.get()
            with contextlib.suppress(LinkDown):
                await device.link.send(message)

    async def _on_signal(self, device_id: str, message: SignalingMessage) -> None:
        if isinstance(message, IceServers):
            await self._ice_servers_issued(device_id, message)
            return
        if isinstance(message, SessionRequest):
            await self._on_session_request(device_id, message)
            return
        if isinstance(message, Error):
            # unknown_session: both ends said session_end at once; the server forgot it first.
            level = logging.DEBUG if message.code == "unknown_session" else logging.WARNING
            log.log(
                level, "device %s: signaling error %s: %s", device_id, message.code, message.message
            )
            return
        session = getattr(message, "session", None)
        row = self.sessions.get(session) if isinstance(session, str) else None
        if row is None or row.device != device_id:
            return
        if row.state is SessionState.BACKOFF and isinstance(message, (SessionEnd, PeerLeft)):
            self._transition(row, SessionEvent.STOP, reason="client left while backing off")
            return
        if not isinstance(message, (Answer, Candidate, SessionEnd, PeerLeft)):
            return
        if row.state not in (SessionState.STARTING, SessionState.RUNNING, SessionState.BACKOFF):
            return
        worker = row.worker
        if worker is None or worker.state == "spawning":
            if len(row.pending) < MAX_PENDING_SIGNALS:
                row.pending.append(message)
            return
        await self._send(worker, Relay(session=row.id, message=encode_signaling(message)))

    async def _on_session_request(self, device_id: str, request: SessionRequest) -> None:
        client = request.client or "?"
        now = time.monotonic()
        if request.session in self.sessions:
            return
        refusal = None
        if self.stopping:
            refusal = "device is shutting down"
        elif self._active_sessions(device_id) >= self.config.max_sessions:
            refusal = "device is at its session limit"
        lineage = self._lineage(device_id, client)
        decision = lineage.decide(now)
        row = SessionRow(
            request.session,
            device_id,
            client,
            SessionState.STARTING,
            now,
            restarts=lineage.crashes(now),
        )
        self.counters["sessions_total"] += 1
        if refusal is None and isinstance(decision, Refuse):
            row.state = SessionState.FATAL
            refusal = (
                f"too many worker crashes for {client} ({decision.crashes} in "
                f"{self.config.restart_window:g} s); retry in {decision.until - now:.0f} s"
            )
            log.error("session %s: FATAL: %s", row.id, refusal)
        if refusal is not None:
            if row.state is SessionState.FATAL:
                row.reason, row.ended_at = refusal, now
                self.sessions[row.id] = row
            self._queue_signal(device_id, SessionEnd(session=request.session, reason=refusal))
            return
        self.sessions[row.id] = row
        if isinstance(decision, StartAfter):
            row.state = SessionState.BACKOFF
            row.reason = f"backing off {decision.delay:.1f} s after {row.restarts} crash(es)"
            log.warning("session %s: %s", row.id, row.reason)
            self._spawn_task(self._start_after(row, decision.delay), f"backoff {row.id}")
            return
        log.info("session %s: client %s asks for %s", row.id, client, device_id)
        self._spawn_task(self._assign(row), f"assign {row.id}")

    async def _start_after(self, row: SessionRow, delay: float) -> None:
        await asyncio.sleep(delay)
        if row.state is SessionState.BACKOFF and not self.stopping:
            self._transition(row, SessionEvent.ELAPSED)
            await self._assign(row)

    async def _assign(self, row: SessionRow) -> None:
        worker = next(
            (
                w
                for w in self.workers.values()
                if w.state == "idle" and w.session is None and not w.reserved and not w.exited
            ),
            None,
        )
        if worker is not None:
            worker.state = "busy"  # taken before any await: no other session can get it
        else:
            log.info("session %s: no idle worker, forking one (cold start)", row.id)
        worker_or_none = worker
        try:
            if worker_or_none is None:
                worker_or_none = await self._spawn_worker(self._new_worker(reserved=True))
        except SupervisorError as exc:
            if row.state is SessionState.STARTING:
                self._transition(row, SessionEvent.ENDED, reason=str(exc))
            self._queue_signal(row.device, SessionEnd(session=row.id, reason=str(exc)))
            return
        worker = worker_or_none
        self._fill_pool()
        if row.state is not SessionState.STARTING:  # the client left meanwhile
            self._signal_worker(worker, signal.SIGTERM)
            return
        worker.session = row.id
        row.worker = worker
        device = self.devices[row.device]
        ice = self._ice()
        await self._send(
            worker,
            Assign(
                session=row.id,
                device=row.device,
                client=row.client,
                services=tuple((s.name, s.host, s.port) for s in device.config.services),
                ice_servers=ice.servers,
                ice_hosts=ice.hosts,
                ice_policy=ice.policy,
            ),
        )
        pending, row.pending = row.pending, []
        for message in pending:
            await self._send(worker, Relay(session=row.id, message=encode_signaling(message)))

    # -- sessions ----------------------------------------------------------------------------

    def _lineage(self, device: str, client: str) -> RestartPolicy:
        key = (device, client)
        policy = self.lineages.get(key)
        if policy is None:
            policy = self.lineages[key] = RestartPolicy(
                self.config.max_restarts,
                self.config.restart_window,
                Backoff(
                    base=self.config.backoff_base,
                    cap=self.config.backoff_cap,
                    floor=min(0.05, self.config.backoff_base),
                ),
            )
        return policy

    def _active_sessions(self, device: str) -> int:
        return sum(
            1
            for r in self.sessions.values()
            if r.device == device
            and r.state
            in (
                SessionState.STARTING,
                SessionState.RUNNING,
                SessionState.BACKOFF,
                SessionState.STOPPING,
            )
        )

    def _transition(
        self, row: SessionRow, event: SessionEvent, *, reason: str | None = None
    ) -> None:
        row.state = transition(row.state, event)
        if reason is not None:
            row.reason = reason
        if row.state in (SessionState.EXITED, SessionState.FATAL):
            row.ended_at = time.monotonic()

    async def kill_session(self, session: str) -> None:
        row = self.sessions.get(session)
        if row is None:
            raise SupervisorError(f"no session {session}")
        if row.state in (SessionState.EXITED, SessionState.FATAL):
            raise SupervisorError(f"session {session} is already {row.state.value}")
        reason = "session killed by the operator"
        self._transition(row, SessionEvent.STOP, reason=reason)
        self._queue_signal(row.device, SessionEnd(session=row.id, reason=reason))
        worker = row.worker
        if worker is not None:
            await self._send(worker, Stop(reason=reason))
            self._spawn_task(self._kill_later(worker, STOP_GRACE), "kill straggler")

    async def _kill_later(self, worker: WorkerProc, delay: float) -> None:
        await asyncio.sleep(delay)
        if worker.id in self.workers:
            self._signal_worker(worker, signal.SIGKILL)

    # -- periodic work -----------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            now = time.monotonic()
            for worker in list(self.workers.values()):
                if worker.state == "spawning" or worker.exited:
                    continue
                if worker.hb.expired(now) and worker.kill_reason is None:
                    worker.kill_reason = (
                        f"worker hung: no heartbeat for {self.config.heartbeat_timeout:g} s; killed"
                    )
                    self.counters["workers_hung"] += 1
                    log.error("worker %s (pid %s): %s", worker.id, worker.pid, worker.kill_reason)
                    self._signal_worker(worker, signal.SIGKILL)
                    continue
                await self._send(worker, Heartbeat())
            self._prune(now)

    def _prune(self, now: float) -> None:
        ended = [r for r in self.sessions.values() if r.ended_at is not None]
        ended.sort(key=lambda r: r.ended_at or 0.0)
        excess = len(ended) - MAX_EXITED_ROWS
        for i, row in enumerate(ended):
            if i < excess or now - (row.ended_at or now) > RETAIN_EXITED:
                self.sessions.pop(row.id, None)
        for key in [k for k, p in self.lineages.items() if p.idle(now)]:
            if not any((r.device, r.client) == key for r in self.sessions.values()):
                del self.lineages[key]

    # -- control endpoint --------------------------------------------------------------------

    async def _control_loop(self) -> None:
        while True:
            frames = await self.control_sock.recv_multipart()
            if len(frames) != 3 or frames[1] != b"":
                self.counters["bad_control_messages"] += 1
                continue
            identity, _, payload = frames
            try:
                request = decode_control_request(payload)
                reply = encode_control_reply(
                    ControlReply(ok=True, result=await self._control(request))
                )
            except IpcError as exc:
                self.counters["bad_control_messages"] += 1
                reply = encode_control_reply(ControlReply(ok=False, error=f"bad request: {exc}"))
            except SupervisorError as exc:
                reply = encode_control_reply(ControlReply(ok=False, error=str(exc) or "failed"))
            except LocalProtocolError as exc:  # our own reply did not fit the protocol
                log.error("control %s: cannot encode the reply: %s", request.cmd, exc)
                reply = encode_control_reply(ControlReply(ok=False, error="internal error"))
            with contextlib.suppress(zmq.ZMQError):
                await self.control_sock.send_multipart([identity, b"", reply])

    async def _control(self, request: ControlRequest) -> object:
        now = time.monotonic()
        if request.cmd == "status":
            return self.status(now)
        if request.cmd == "sessions":
            return [
                row.to_json(now) for row in sorted(self.sessions.values(), key=lambda r: r.created)
            ]
        if request.cmd == "kill":
            assert request.session is not None
            await self.kill_session(request.session)
            return {"session": request.session}
        if request.cmd == "stop":
            self.request_stop(
                request.drain_timeout
                if request.drain_timeout is not None
                else self.config.drain_timeout
            )
            return {"stopping": True}
        raise SupervisorError(f"unknown command {request.cmd!r}")

    def status(self, now: float) -> dict[str, Any]:
        devices = []
        for device_id, device in self.devices.items():
            rows = [r for r in self.sessions.values() if r.device == device_id]
            if device.rejected:
                state = "fatal"
            elif any(r.state in (SessionState.BACKOFF, SessionState.FATAL) for r in rows):
                state = "backoff"
            else:
                state = "ok"
            devices.append(
                {
                    "id": device_id,
                    "link": {"up": "up", "connecting": "connecting"}.get(
                        device.link.state.value, "down"
                    ),
                    "state": state,
                    "sessions": self._active_sessions(device_id),
                    "services": [s.name for s in device.config.services],
                }
            )
        workers = list(self.workers.values())
        return {
            "pid": os.getpid(),
            "uptime_s": round(now - self.started, 3),
            "state": "stopping" if self.stopping else "running",
            "runtime_dir": str(self.runtime_dir),
            "devices": devices,
            "pool": {
                "idle": sum(1 for w in workers if w.state == "idle" and w.session is None),
                "spawning": sum(1 for w in workers if w.state == "spawning"),
                "busy": sum(1 for w in workers if w.state in ("busy", "exiting")),
                "target": self.config.pool_size,
            },
            "sessions": sum(self._active_sessions(d) for d in self.devices),
            "ready": self.ready,
            "fork_server_pid": self._zygote.pid if self._zygote else None,
            "workers": [
                {"id": w.id, "pid": w.pid, "state": w.state, "session": w.session}
                for w in workers
                if w.pid is not None
            ],
            "counters": dict(self.counters),
        }

    # -- tasks -------------------------------------------------------------------------------

    def _spawn_task(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("supervisor task %s failed: %s", task.get_name(), exc, exc_info=exc)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
