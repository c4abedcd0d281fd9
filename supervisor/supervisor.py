"""The supervisor process: the I/O shell around :class:`supervisor.core.SupervisorCore`.

It holds one signaling link per hosted device, the worker and control ZeroMQ
sockets (PROTOCOL.md §3, §4), the fork server's pipes (:mod:`workers.zygote`;
this module never imports ``workers`` or aiortc, it starts the fork server by
module path), a pidfd per worker and the SIGTERM/SIGINT handlers. Everything
that happens there becomes an event for the core; every action the core returns
is carried out here, in order; and one timer is armed at the core's next
deadline. The decisions (which worker gets which session, crash or clean end,
restart policy, heartbeats, draining) are the core's alone.

Shutdown (``tunnelctl stop``, SIGTERM, SIGINT) drains: the core refuses new
sessions, tells busy workers to drain, then asks for SIGTERM and SIGKILL; once it
says :class:`~supervisor.events.Stopped`, the fork server and the links are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import zmq
import zmq.asyncio

from aio.metrics_http import MetricsEndpoint
from aio.tasks import TaskSet
from protocol.errors import LocalProtocolError
from protocol.forkserver import (
    Command,
    Configure,
    Exited,
    ForkServerLineError,
    Ready,
    Spawn,
    Spawned,
    decode_report,
    encode_command,
)
from protocol.ipc import ZMQ_HWM, ZMQ_MAX_MSG_SIZE, encode_ipc
from protocol.signaling import SignalingMessage
from signaling.errors import LinkDown, LinkRejected
from signaling.link import LinkState, SignalingLink, TokenSource, token_file_source
from supervisor.config import DeviceConfig, SupervisorConfig
from supervisor.core import SPAWN_TIMEOUT, STOP_GRACE, SupervisorCore
from supervisor.errors import SupervisorError
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
    ReplyControl,
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
from supervisor.events import LinkRejected as LinkRejectedEvent
from supervisor.metrics import SupervisorMetrics
from supervisor.notify import sd_notify
from supervisor.runtime import (
    CONTROL_SOCKET,
    WORKERS_SOCKET,
    RuntimeLock,
    ipc_endpoint,
    prepare_runtime_dir,
)

_NOT_FOR_WORKERS = frozenset(
    {"NOTIFY_SOCKET", "TUNNEL_TOKEN", "TUNNEL_SECRET", "TUNNEL_TURN_PASSWORD"}
)

log = logging.getLogger("tunnelctl.supervisor")

# A worker's last message ("ended") can still be in ZeroMQ's I/O thread when its
# pidfd says it exited: judged at once, a clean end would read "worker exited"
# instead of its reason. Its exit is judged this long after, messages first.
EXIT_GRACE = 0.1


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
        self.core = SupervisorCore(
            config, time.monotonic(), pid=os.getpid(), runtime_dir=str(runtime_dir)
        )
        self.ctx: zmq.asyncio.Context | None = None
        self._links: dict[str, SignalingLink] = {}
        self._outboxes: dict[str, asyncio.Queue[SignalingMessage]] = {}
        self._pidfds: dict[str, int] = {}
        self._tasks = TaskSet(log)
        self._zygote: asyncio.subprocess.Process | None = None
        self._zygote_ready: asyncio.Future[int] | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._drain_timeout = config.drain_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.metrics = SupervisorMetrics(self.core)
        self._metrics_endpoint: MetricsEndpoint | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until asked to stop; raise :class:`SupervisorError` if start-up fails."""
        loop = asyncio.get_running_loop()
        self._stopped = loop.create_future()
        prepare_runtime_dir(self.runtime_dir)
        lock = RuntimeLock(self.runtime_dir)
        lock.acquire()
        try:
            if self.config.metrics is not None:
                self._metrics_endpoint = await self.metrics.serve(*self.config.metrics)
                if self.on_ready is not None:
                    self.on_ready(f"metrics {self._metrics_endpoint.url}")
            self._bind()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop, self.config.drain_timeout)
            try:
                await self._start()
                await asyncio.shield(self._stopped)
            finally:
                await self._shutdown()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
        finally:
            self._unbind()
            if self._metrics_endpoint is not None:
                await self._metrics_endpoint.close()
            lock.release()
        log.info("supervisor stopped (drain timeout was %.1f s)", self._drain_timeout)

    def request_stop(self, drain_timeout: float) -> None:
        self._feed(StopRequested(drain_timeout))

    def _bind(self) -> None:
        self.ctx = zmq.asyncio.Context()
        self.workers_sock = self.ctx.socket(zmq.ROUTER)
        self.control_sock = self.ctx.socket(zmq.ROUTER)
        for sock in (self.workers_sock, self.control_sock):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, ZMQ_HWM)
            sock.setsockopt(zmq.RCVHWM, ZMQ_HWM)
            sock.setsockopt(zmq.MAXMSGSIZE, ZMQ_MAX_MSG_SIZE)
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
        self._tasks.spawn(self._worker_loop(), "worker-messages")
        self._tasks.spawn(self._control_loop(), "control")
        self._arm()
        await self._start_zygote()
        for device_config in self.config.devices:
            self._add_device(device_config)
        results = await asyncio.gather(
            *(self._wait_registered(d) for d in self.config.devices), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        names = ",".join(self._links)
        self._feed(Started())
        if self.on_ready is not None:
            self.on_ready(f"ready pid={os.getpid()} devices={names} runtime={self.runtime_dir}")
        sd_notify(f"READY=1\nSTATUS=serving {names}")

    async def _wait_registered(self, config: DeviceConfig) -> None:
        try:
            await self._links[config.id].wait_up(30.0)
        except LinkRejected as exc:
            raise SupervisorError(f"device {config.id}: {exc}") from None
        except LinkDown as exc:
            # The signaling server may come later; the link keeps trying.
            log.warning("device %s: %s; still trying", config.id, exc)
            return
        if self.on_ready is not None:
            services = " ".join(f"{s.name}={s.host}:{s.port}" for s in config.services)
            self.on_ready(f"registered {config.id} {services}")

    def _add_device(self, config: DeviceConfig) -> None:
        def on_message(message: SignalingMessage) -> None:
            self._feed(SignalReceived(config.id, message))

        def on_state(state: LinkState) -> None:
            self._feed(LinkChanged(config.id, state.value))

        token: str | TokenSource = config.token
        if config.token_file is not None:
            token = token_file_source(config.token_file, config.token)
        link = SignalingLink(
            self.config.signal_urls,
            token,
            on_message,
            device=config.id,
            services=[s.name for s in config.services],
            on_state=on_state,
        )
        self._links[config.id] = link
        link.start()
        self._tasks.spawn(self._watch_link(config.id, link), f"link {config.id}")
        outbox: asyncio.Queue[SignalingMessage] = asyncio.Queue(maxsize=4096)
        self._outboxes[config.id] = outbox
        self._tasks.spawn(self._outbox_loop(link, outbox), f"outbox {config.id}")

    async def _watch_link(self, device: str, link: SignalingLink) -> None:
        try:
            await link.run_until_closed()
        except LinkRejected as exc:
            self._feed(LinkRejectedEvent(device, str(exc)))

    async def _outbox_loop(
        self, link: SignalingLink, outbox: asyncio.Queue[SignalingMessage]
    ) -> None:
        while True:
            message = await outbox.get()
            with contextlib.suppress(LinkDown):
                await link.send(message)

    async def _shutdown(self) -> None:
        assert self._stopped is not None
        self.request_stop(self.config.drain_timeout)  # no-op if already stopping
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self._stopped)
        if self._timer is not None:
            self._timer.cancel()
        await self._stop_zygote()
        for link in self._links.values():
            await link.close()
        for fd in self._pidfds.values():
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)
        self._pidfds.clear()
        await self._tasks.cancel_all()

    # -- the core: events in, actions out, one timer ------------------------------------------

    def _feed(self, event: Event) -> None:
        try:
            actions = self.core.handle(time.monotonic(), event)
        except LocalProtocolError as exc:  # a transition the tables forbid: a bug, logged
            log.error("supervisor: %s (on %s)", exc, type(event).__name__)
            actions = []
        except Exception:  # a bug must not stop the timer or the socket loops
            log.exception("supervisor: failed on %s", type(event).__name__)
            actions = []
        self._execute(actions)

    def _on_timer(self) -> None:
        at, self._timer, self._timer_at = self._timer_at, None, None
        self._drain_worker_messages()
        # call_at may run a hair early; the core must see its deadline as reached.
        now = max(time.monotonic(), at or 0.0)
        try:
            actions = self.core.handle_timer(now)
        except LocalProtocolError as exc:
            log.error("supervisor: %s (on a timer)", exc)
            actions = []
        except Exception:
            log.exception("supervisor: failed on a timer")
            actions = []
        self._execute(actions)

    def _arm(self) -> None:
        deadline = self.core.next_deadline()
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_at = None
        if deadline is not None:
            # The event loop's clock is time.monotonic(), the core's clock.
            self._timer = asyncio.get_running_loop().call_at(deadline, self._on_timer)
            self._timer_at = deadline

    def _execute(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendToWorker):
                self._send(self.workers_sock, [action.worker.encode(), encode_ipc(action.message)])
            elif isinstance(action, SendSignal):
                self._queue_signal(action.device, action.message)
            elif isinstance(action, ReplyControl):
                self._send(self.control_sock, [action.identity, b"", action.payload])
            elif isinstance(action, ForkWorker):
                self._ask_zygote(Spawn(action.worker))
            elif isinstance(action, WatchWorker):
                self._watch_exit(action.worker, action.pid)
            elif isinstance(action, KillProcess):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(action.pid, signal.SIGKILL if action.hard else signal.SIGTERM)
            elif isinstance(action, ForgetWorker):
                self._unwatch(action.worker)
            elif isinstance(action, ConfigureForkServer):
                self._ask_zygote(Configure(action.ice))
            elif isinstance(action, StartForkServer):
                self._tasks.spawn(self._start_zygote(), "fork server")
            elif isinstance(action, Stopping):
                self._drain_timeout = action.drain_timeout
                sd_notify("STOPPING=1")
            elif (
                isinstance(action, Stopped)
                and self._stopped is not None
                and not self._stopped.done()
            ):
                self._stopped.set_result(None)
        if self.ctx is not None:
            self._arm()

    def _send(self, sock: zmq.asyncio.Socket, frames: list[bytes]) -> None:
        """Send without waiting: a peer that is gone (EHOSTUNREACH under
        ROUTER_MANDATORY) or not reading (its high-water mark) loses the message."""
        try:
            # zmq.asyncio tries DONTWAIT sends at once and returns a finished
            # future (and wakes its pending receives, which a shadow socket would not).
            sent = cast("asyncio.Future[object]", sock.send_multipart(frames, flags=zmq.DONTWAIT))
        except zmq.ZMQError as exc:  # the socket is closed: shutting down
            log.debug("cannot send: %s", exc)
            return
        if not sent.done():
            sent.add_done_callback(_consume)
        elif sent.exception() is not None:
            log.debug("cannot send to %r: %s", frames[0][:32], sent.exception())

    def _queue_signal(self, device_id: str, message: SignalingMessage) -> None:
        """Send on the device's link, in order, without waiting (LinkDown: dropped)."""
        outbox = self._outboxes.get(device_id)
        if outbox is None:
            return
        try:
            outbox.put_nowait(message)
        except asyncio.QueueFull:
            log.warning("device %s: signaling outbox full, message dropped", device_id)

    # -- sockets -----------------------------------------------------------------------------

    async def _worker_loop(self) -> None:
        while True:
            frames = await self.workers_sock.recv_multipart()
            self._feed(WorkerFrames(tuple(frames)))

    def _drain_worker_messages(self) -> None:
        """Read what is queued on the worker socket: a worker's last messages
        ("ended") must count before its exit is judged."""
        if self.ctx is None:
            return
        for _ in range(ZMQ_HWM):
            try:
                frames = self._workers_sync.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.ZMQError:  # zmq.Again included: nothing left
                return
            self._feed(WorkerFrames(tuple(frames)))

    async def _control_loop(self) -> None:
        while True:
            frames = await self.control_sock.recv_multipart()
            self._feed(ControlFrames(tuple(frames)))

    # -- worker processes --------------------------------------------------------------------

    def _watch_exit(self, worker: str, pid: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            loop.call_soon(self._worker_gone, worker)
            return
        self._pidfds[worker] = pidfd
        loop.add_reader(pidfd, self._worker_gone, worker)

    def _worker_gone(self, worker: str) -> None:
        loop = asyncio.get_running_loop()
        pidfd = self._pidfds.get(worker)
        if pidfd is not None:
            loop.remove_reader(pidfd)
        loop.call_later(EXIT_GRACE, self._judge_gone, worker)

    def _judge_gone(self, worker: str) -> None:
        self._drain_worker_messages()
        self._feed(WorkerGone(worker))

    def _unwatch(self, worker: str) -> None:
        pidfd = self._pidfds.pop(worker, None)
        if pidfd is not None:
            asyncio.get_running_loop().remove_reader(pidfd)
            os.close(pidfd)

    # -- the fork server ---------------------------------------------------------------------

    def _worker_environment(self) -> dict[str, str]:
        """Ours, minus what the fork server and workers must not hold.

        Only the supervisor talks to systemd (NotifyAccess=main), and only it
        needs the device tokens: a worker gets its TURN credentials in its
        assign message. Dropped by name (TUNNEL_TOKEN, TUNNEL_SECRET,
        TUNNEL_TURN_PASSWORD) and by value (any variable a config's
        ``token_env`` or ``credential_env`` named).
        """
        held = {d.token for d in self.config.devices}
        held |= {s.credential for s in self.config.ice_servers if s.credential}
        return {
            k: v
            for k, v in os.environ.items()
            if k not in _NOT_FOR_WORKERS and v.strip() not in held
        }

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
            env=self._worker_environment(),
        )
        self._tasks.spawn(self._zygote_reader(self._zygote), "zygote")
        try:
            pid = await asyncio.wait_for(asyncio.shield(self._zygote_ready), SPAWN_TIMEOUT)
        except TimeoutError:
            raise SupervisorError("the worker fork server did not start") from None
        log.info("worker fork server ready (pid %d)", pid)
        self._feed(ForkServerUp(pid))

    def _ask_zygote(self, command: Command) -> None:
        """On its stdin (so TURN credentials in ``config`` never show in ``ps``)."""
        zygote = self._zygote
        if zygote is None or zygote.stdin is None or zygote.returncode is not None:
            return  # the core knows it is down; a spawn asked meanwhile times out
        zygote.stdin.write(encode_command(command))

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
        ready = self._zygote_ready
        while True:
            try:
                raw = await zygote.stdout.readuntil(b"\n")
            except asyncio.IncompleteReadError:
                break  # end of file
            except asyncio.LimitOverrunError as exc:
                await zygote.stdout.readexactly(exc.consumed)  # skip it; the rest is lines
                log.warning("fork server: line too long")
                continue
            try:
                report = decode_report(raw)
            except ForkServerLineError:
                report = None
            if isinstance(report, Ready) and ready and not ready.done():
                ready.set_result(report.pid)
            elif isinstance(report, Spawned):
                self._feed(WorkerSpawned(report.worker, report.pid))
            elif isinstance(report, Exited):
                self._drain_worker_messages()
                self._feed(WorkerExitCode(report.pid, report.code))
            else:
                log.warning("fork server: %s", raw.decode("ascii", "replace").strip())
        code = await zygote.wait()
        if ready and not ready.done():
            ready.set_exception(SupervisorError(f"fork server exited with {code}"))
        self._feed(ForkServerDown(code))


def _consume(future: asyncio.Future[object]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved, so asyncio does not log it
