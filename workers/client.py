"""The client side: ``tunnelctl connect``, a local port forward through a tunnel.

:class:`ClientTunnel` keeps one peer session with a device: it asks the
signaling server for a session, answers the device's offer, and wraps the
DataChannel in a :class:`TunnelBridge`. When the session is lost (the device
restarted, the path broke) it is re-established with capped, jittered backoff.

:class:`PortForward` listens on a local TCP port (like ``ssh -L``) and carries
each accepted connection to the device's service on a stream of its own.

Failures that retrying cannot fix end the forward with one clear reason
(:attr:`ClientTunnel.fatal`): a refused token, a device the token does not grant,
an unknown device at start-up, a service the device does not expose.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from aiortc import RTCDataChannel

from aio.tasks import TaskSet
from protocol.backoff import Backoff
from protocol.frames import ResetCode
from protocol.ice import IcePolicy, IceServer
from protocol.mux import Role
from protocol.signaling import (
    Candidate,
    Error,
    IceServers,
    Offer,
    PeerLeft,
    SessionEnd,
    SessionRequest,
    SignalingMessage,
    new_session_id,
)
from signaling.errors import LinkDown, LinkRejected
from signaling.link import SignalingLink
from workers.bridge import TunnelBridge
from workers.errors import (
    DeviceBusy,
    DeviceOffline,
    ServiceNotExposed,
    SessionFailed,
    SignalingRejected,
    TunnelError,
)
from workers.peer import PeerSession, warm_up_crypto

log = logging.getLogger("tunnelctl.client")

OPEN_TIMEOUT = 30.0
WAIT_FOR_TUNNEL = 30.0
#: Signaling errors that mean "this will never work": give up at once.
FATAL_CODES = {"forbidden", "not_authenticated"}


class ClientTunnel:
    """One client's (re-established) session with one device."""

    def __init__(
        self,
        *,
        signal_url: str,
        device: str,
        token: str,
        ice_servers: Sequence[IceServer] = (),
        ice_policy: IcePolicy = "all",
    ) -> None:
        self.device = device
        self.ice_servers = tuple(ice_servers)
        self.ice_policy: IcePolicy = ice_policy
        # From the signaling server (fresh TURN credentials), used after ours.
        self.issued_ice_servers: tuple[IceServer, ...] = ()
        self.link = SignalingLink(signal_url, token, self._on_signal, fail_fast=True)
        self.bridge: TunnelBridge | None = None
        self.peer: PeerSession | None = None
        self.fatal: TunnelError | None = None
        self.open_seconds: float | None = None
        self._pending: asyncio.Future[None] | None = None
        self._ready = asyncio.Event()
        self._fatal_event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._backoff = Backoff(base=0.5, cap=15.0)
        self._tasks = TaskSet(log)
        self._ended_by_device: str | None = None  # no session_end back for those

    async def open(self, timeout: float = OPEN_TIMEOUT) -> None:
        """Establish the first session; raise on any failure (nothing is retried)."""
        self.link.start()
        # OpenSSL's first-use costs, paid while the WebSocket handshake is in flight.
        warming = asyncio.ensure_future(asyncio.to_thread(warm_up_crypto))
        try:
            await self.link.wait_up(timeout)
            await warming
        except LinkRejected as exc:
            raise SignalingRejected(str(exc)) from None
        except LinkDown as exc:
            raise SessionFailed(str(exc)) from None
        deadline = time.monotonic() + timeout
        busy = Backoff(base=0.2, cap=2.0)
        while True:
            try:
                await self._establish(max(1.0, deadline - time.monotonic()))
                return
            except DeviceBusy as exc:
                # The server limits sessions negotiating at once per device (PROTOCOL.md
                # §1.5); in a burst of clients, waiting a moment is the cure.
                delay = busy.next_delay()
                if time.monotonic() + delay > deadline:
                    raise SessionFailed(f"device {self.device} is busy: {exc}") from None
                log.info("device %s is busy; asking again in %.1f s", self.device, delay)
                await asyncio.sleep(delay)

    def keep_alive(self) -> None:
        """From now on, re-establish the session in the background whenever it is lost."""
        self._task = asyncio.get_running_loop().create_task(self._maintain())

    async def wait_fatal(self) -> TunnelError:
        await self._fatal_event.wait()
        assert self.fatal is not None
        return self.fatal

    async def current_bridge(self, timeout: float = WAIT_FOR_TUNNEL) -> TunnelBridge | None:
        """The open tunnel, waiting up to ``timeout`` while it is being re-established."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout)
        bridge = self.bridge
        return bridge if bridge is not None and not bridge.is_closed else None

    def fail(self, error: TunnelError) -> None:
        if self.fatal is None:
            self.fatal = error
            self._fatal_event.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._end_session("client closing", notify=True)
        await self.link.close()
        await self._tasks.cancel_all()

    # -- session lifecycle ----------------------------------------------------

    async def _establish(self, timeout: float) -> None:
        started = time.perf_counter()
        session_id = new_session_id()
        peer = PeerSession(
            session_id,
            self.link.send,
            ice_servers=self.ice_servers + self.issued_ice_servers,
            ice_policy=self.ice_policy,
            on_relay_lost=self._relay_lost,
        )
        self.peer = peer
        self._pending = asyncio.get_running_loop().create_future()
        try:
            try:
                await self.link.send(SessionRequest(session=session_id, device=self.device))
            except LinkDown as exc:
                raise SessionFailed(str(exc)) from None
            opened: asyncio.Future[RTCDataChannel] = asyncio.ensure_future(peer.wait_open(timeout))
            refused = self._pending
            waiting: set[asyncio.Future[Any]] = {opened, refused}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if refused in done:
                opened.cancel()
                refused.result()  # raises the refusal
                raise SessionFailed("session refused")
            refused.cancel()
            channel = opened.result()
        except BaseException as exc:
            # A session the server refused never existed there: nothing to end.
            await self._end_session("session set-up failed", notify=not _refused_by_server(exc))
            raise
        self.open_seconds = time.perf_counter() - started
        self.bridge = TunnelBridge(
            channel, Role.CLIENT, on_refused=self._on_refused, label=f"session {session_id}: "
        )
        self._ready.set()
        log.info(
            "session %s with %s open in %.0f ms, %s",
            session_id,
            self.device,
            self.open_seconds * 1000,
            peer.nominated_path() or "unknown path",
        )

    async def _maintain(self) -> None:
        while self.fatal is None:
            bridge = self.bridge
            if bridge is not None:
                reason = await bridge.wait_closed()
                self._ready.clear()
                log.warning("tunnel to %s lost: %s; re-establishing", self.device, reason)
                await self._end_session(reason, notify=True)
            try:
                await self.link.wait_up(None)
                await self._establish(OPEN_TIMEOUT)
                self._backoff.reset()
            except SignalingRejected as exc:
                self.fail(exc)
            except LinkRejected as exc:
                self.fail(SignalingRejected(str(exc)))
            except (SessionFailed, LinkDown, OSError) as exc:
                delay = self._backoff.next_delay()
                log.warning(
                    "cannot re-establish the tunnel to %s: %s; retrying in %.1f s",
                    self.device,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _end_session(self, reason: str, *, notify: bool) -> None:
        peer, self.peer = self.peer, None
        bridge, self.bridge = self.bridge, None
        self._ready.clear()
        if bridge is not None:
            bridge.close(reason)
        if peer is not None:
            if notify and peer.session_id != self._ended_by_device:
                with contextlib.suppress(LinkDown):
                    await self.link.send(SessionEnd(session=peer.session_id, reason=reason[:200]))
            await peer.close()

    def _on_refused(self, service: str, code: int, reason: str) -> None:
        if code == ResetCode.UNKNOWN_SERVICE:
            self.fail(
                ServiceNotExposed(f"device {self.device} does not expose service {service!r}")
            )
        else:
            log.warning("device %s refused a connection to %r: %s", self.device, service, reason)

    def _relay_lost(self, url: str, reason: str) -> None:
        peer, bridge = self.peer, self.bridge
        if peer is not None and bridge is not None and peer.relay_in_use(url):
            bridge.close(f"TURN allocation on {url} lost: {reason}")

    def _on_signal(self, message: SignalingMessage) -> None:
        peer = self.peer
        session = getattr(message, "session", None)
        if isinstance(message, IceServers):
            # Sent before welcome, so the first session already has them.
            self.issued_ice_servers = message.ice_servers
            log.debug("%d ICE server(s) from the signaling server", len(message.ice_servers))
            return
        if isinstance(message, Error):
            self._on_error(message, peer)
            return
        if peer is None or session != peer.session_id:
            return
        if isinstance(message, Offer):
            self._spawn_for(peer, peer.handle_offer(message.sdp))
        elif isinstance(message, Candidate):
            self._spawn_for(peer, peer.handle_candidate(message.candidate))
        elif isinstance(message, SessionEnd):
            self._ended_by_device = peer.session_id
            log.warning("device %s ended the session: %s", self.device, message.reason)
            self._refuse(SessionFailed(f"device ended the session: {message.reason}"))
            if self.bridge is not None:
                self.bridge.close(f"device ended the session: {message.reason}")
        elif isinstance(message, PeerLeft):
            self._refuse(SessionFailed("device left during negotiation"))

    def _on_error(self, error: Error, peer: PeerSession | None) -> None:
        log.debug("signaling error %s: %s", error.code, error.message)
        if error.code in FATAL_CODES:
            exc: TunnelError = SignalingRejected(f"signaling server refused: {error.message}")
            self._refuse(exc)
            self.fail(exc)
        elif error.code == "device_offline":
            self._refuse(DeviceOffline(f"device {self.device} is offline"))
        elif error.code == "too_many_sessions" and peer is not None:
            self._refuse(DeviceBusy(error.message))
        elif peer is not None and error.session == peer.session_id:
            self._refuse(SessionFailed(f"{error.code}: {error.message}"))
        else:
            log.warning("signaling server: %s: %s", error.code, error.message)

    def _refuse(self, exc: TunnelError) -> None:
        if self._pending is not None and not self._pending.done():
            self._pending.set_exception(exc)

    def _spawn_for(self, peer: PeerSession, coro: Coroutine[Any, Any, Any]) -> None:
        async def guarded() -> None:
            try:
                await coro
            except SessionFailed as exc:
                if peer is self.peer:
                    self._refuse(exc)

        self._tasks.spawn(guarded(), name=f"session {peer.session_id} signal")


def _refused_by_server(exc: BaseException) -> bool:
    return isinstance(exc, (DeviceBusy, DeviceOffline, SignalingRejected))


class PortForward:
    """Listen on a local TCP port and carry each connection through the tunnel."""

    def __init__(self, tunnel: ClientTunnel, service: str, host: str, port: int) -> None:
        self.tunnel = tunnel
        self.service = service
        self.host = host
        self.port = port
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> tuple[str, int]:
        """Start listening; return the bound address (port 0 picks a free one)."""
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        sockname = self._server.sockets[0].getsockname()
        self.port = int(sockname[1])
        return str(sockname[0]), self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        bridge = await self.tunnel.current_bridge()
        if bridge is None:
            log.warning("no tunnel to %s; dropping a local connection", self.tunnel.device)
            writer.transport.abort()
            return
        try:
            bridge.attach(self.service, reader, writer)
        except TunnelError as exc:
            log.warning("cannot open a stream: %s", exc)
            writer.transport.abort()
        except Exception as exc:  # a closed bridge raises LocalProtocolError
            log.warning("cannot open a stream: %s", exc)
            writer.transport.abort()
