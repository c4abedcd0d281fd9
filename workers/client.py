"""The client side of one device: its session, and port forwards through it.

:class:`ClientTunnel` keeps one peer session with a device: it asks the
signaling server for a session, answers the device's offer, and wraps the
DataChannel in a :class:`TunnelBridge`. When the session is lost (the device
restarted, the path broke) it is re-established with capped, jittered backoff.
Before that, :meth:`ClientTunnel.list_devices` asks what the token may reach
(PROTOCOL.md §1.3). A ``tunnelctl connect`` process is :mod:`workers.client_app`.

:class:`PortForward` listens on a local TCP port (like ``ssh -L``) and carries
each accepted connection to the device's service on a stream of its own
(:func:`carry`, which also carries streams handed over by ``connect --stdio``).

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
from dataclasses import dataclass
from typing import Any

from aiortc import RTCDataChannel

from aio.tasks import TaskSet
from protocol.backoff import Backoff
from protocol.frames import ResetCode
from protocol.ice import DEFAULT_KEEPALIVE, IcePolicy, IceServer
from protocol.mux import Role
from protocol.signaling import (
    MAX_REASON_LEN,
    Candidate,
    DeviceInfo,
    Error,
    IceServers,
    Offer,
    PeerLeft,
    SessionEnd,
    SessionRequest,
    SignalingMessage,
    new_session_id,
)
from signaling.discovery import DeviceQuery, list_devices
from signaling.errors import LinkDown, LinkRejected
from signaling.link import LinkState, SignalingLink, TokenSource
from workers.bridge import TunnelBridge, abort_connection
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
#: While the tunnel is being re-established, a fresh attempt begins this often
#: (seconds) until one opens, so an attempt begun while the path was down (its
#: checks backing off, its STUN lookup failed) never delays the recovery.
RETRY_EVERY = 1.0
#: Attempts in flight at once while re-establishing.
MAX_ATTEMPTS = 4
#: Each attempt's time to open: this many times the first open, within bounds.
ATTEMPT_TIMEOUT_FACTOR = 4.0
MIN_ATTEMPT_TIMEOUT = 4.0
#: For this long after a loss, attempts start every RETRY_EVERY; later, with
#: capped backoff, so a device gone for good is not asked every second forever.
FAST_RETRY_WINDOW = 120.0
#: Seconds the signaling server gets to answer a ping after the path died (the
#: network may have changed under both): without an answer the link is remade.
LINK_PROBE_TIMEOUT = 2.0
#: Signaling errors that mean "this will never work": give up at once.
FATAL_CODES = {"forbidden", "not_authenticated"}


@dataclass(eq=False)
class _Attempt:
    """One session request in flight: its peer, and the server's refusal if any."""

    peer: PeerSession
    refused: asyncio.Future[None]
    started: float


class ClientTunnel:
    """One client's (re-established) session with one device.

    ``keepalive`` bounds both how long a dead path goes unnoticed (ICE consent,
    :mod:`workers.aiortc_tuning`) and how long a new local connection waits for
    a tunnel that is being re-established before it is reset.
    """

    def __init__(
        self,
        *,
        signal_url: str | Sequence[str],
        device: str,
        token: str | TokenSource,
        ice_servers: Sequence[IceServer] = (),
        ice_policy: IcePolicy = "all",
        keepalive: float = DEFAULT_KEEPALIVE,
    ) -> None:
        self.device = device
        self.ice_servers = tuple(ice_servers)
        self.ice_policy: IcePolicy = ice_policy
        self.keepalive = keepalive
        # From the signaling server (fresh TURN credentials), used after ours.
        self.issued_ice_servers: tuple[IceServer, ...] = ()
        self.signal_urls = (signal_url,) if isinstance(signal_url, str) else tuple(signal_url)
        self.link = self._make_link(token)
        self.bridge: TunnelBridge | None = None
        self.peer: PeerSession | None = None
        self.fatal: TunnelError | None = None
        self.open_seconds: float | None = None
        #: Sessions re-established after a loss (the first one is not counted).
        self.reconnects = 0
        #: Bytes carried by the sessions that ended (the current one's are its bridge's).
        self.ended_bytes_in = 0
        self.ended_bytes_out = 0
        self._first_open: float | None = None
        self._attempts: dict[str, _Attempt] = {}
        self._ready = asyncio.Event()
        self._fatal_event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._backoff = Backoff(base=0.5, cap=15.0)
        self._tasks = TaskSet(log)
        self._ended_by_device: str | None = None  # no session_end back for those
        self._link_probe: asyncio.Task[bool] | None = None
        self._link_started = False
        self._discovery = DeviceQuery()
        #: Services whose refusal as unknown ends this client (its forwards'); a
        #: refused handed-off stream ends only that stream. ``None``: every service.
        self.essential_services: frozenset[str] | None = None

    def _make_link(self, token: str | TokenSource) -> SignalingLink:
        # The link tries the URLs in order and fails over between them.
        return SignalingLink(self.signal_urls, token, self._on_signal, fail_fast=True)

    async def start_link(self, timeout: float = OPEN_TIMEOUT) -> None:
        """Connect to the signaling server (once); raise if it refuses or cannot be reached."""
        if self._link_started:
            await self._wait_link(self.link.wait_up(timeout))
            return
        self._link_started = True
        self.link.start()
        # OpenSSL's first-use costs, paid while the WebSocket handshake is in flight.
        warming = asyncio.ensure_future(asyncio.to_thread(warm_up_crypto))
        await self._wait_link(self.link.wait_up(timeout))
        await warming

    async def _wait_link(self, up: Coroutine[Any, Any, None]) -> None:
        try:
            await up
        except LinkRejected as exc:
            raise SignalingRejected(str(exc)) from None
        except LinkDown as exc:
            raise SessionFailed(str(exc)) from None

    async def list_devices(self) -> tuple[DeviceInfo, ...]:
        """The devices the token grants, online or not, with their services (link up)."""
        try:
            return await list_devices(self.link, self._discovery)
        except LinkRejected as exc:
            raise SignalingRejected(_user_words(str(exc))) from None
        except LinkDown as exc:
            raise SessionFailed(str(exc)) from None

    async def open(self, timeout: float = OPEN_TIMEOUT) -> None:
        """Establish the first session; raise on any failure (nothing is retried)."""
        await self.start_link(timeout)
        deadline = time.monotonic() + timeout
        busy = Backoff(base=0.2, cap=2.0)
        while True:
            try:
                self._adopt(*await self._attempt(max(1.0, deadline - time.monotonic())))
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

    async def current_bridge(self, timeout: float | None = None) -> TunnelBridge | None:
        """The open tunnel, waiting up to ``timeout`` (default: the keepalive) while
        it is being re-established; ``None`` if there is none by then."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self._ready.wait(), self.keepalive if timeout is None else timeout
            )
        bridge = self.bridge
        return bridge if bridge is not None and not bridge.is_closed else None

    def fail(self, error: TunnelError) -> None:
        if self.fatal is None:
            self.fatal = error
            self._fatal_event.set()
            for attempt in self._attempts.values():
                _settle(attempt.refused, error)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._end_session("client closing", notify=True, wait=True)
        await self.link.close()
        await self._tasks.cancel_all()

    # -- session lifecycle ----------------------------------------------------

    async def _attempt(self, timeout: float) -> tuple[PeerSession, RTCDataChannel, float]:
        """Ask for one session and wait until its DataChannel opens; raise otherwise.

        Each attempt gathers its candidates afresh, so one made after the path
        came back has the server-reflexive and relayed candidates that one made
        during the outage could not get.
        """
        started = time.perf_counter()
        session_id = new_session_id()
        peer = PeerSession(
            session_id,
            self.link.send,
            ice_servers=self.ice_servers + self.issued_ice_servers,
            ice_policy=self.ice_policy,
            on_relay_lost=self._relay_lost,
            keepalive=self.keepalive,
        )
        attempt = _Attempt(peer, asyncio.get_running_loop().create_future(), started)
        self._attempts[session_id] = attempt
        if self.fatal is not None:
            _settle(attempt.refused, self.fatal)
        try:
            try:
                await self.link.send(SessionRequest(session=session_id, device=self.device))
            except LinkDown as exc:
                raise SessionFailed(str(exc)) from None
            opened: asyncio.Future[RTCDataChannel] = asyncio.ensure_future(peer.wait_open(timeout))
            waiting: set[asyncio.Future[Any]] = {opened, attempt.refused}
            try:
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            finally:
                opened.cancel()
            if attempt.refused in done:
                if opened.done() and not opened.cancelled():
                    opened.exception()  # retrieved: the refusal is what we report
                attempt.refused.result()  # raises the refusal
                raise SessionFailed("session refused")
            attempt.refused.cancel()
            return peer, opened.result(), started
        except BaseException as exc:
            # A session the server refused never existed there: nothing to end.
            await self._discard(peer, "session set-up failed", notify=not _refused_by_server(exc))
            raise
        finally:
            self._attempts.pop(session_id, None)

    def _adopt(self, peer: PeerSession, channel: RTCDataChannel, started: float) -> None:
        """Make an opened attempt the tunnel that local connections use."""
        self.open_seconds = time.perf_counter() - started
        if self._first_open is None:
            self._first_open = self.open_seconds
        else:
            self.reconnects += 1
        self.peer = peer
        self.bridge = TunnelBridge(
            channel, Role.CLIENT, on_refused=self._on_refused, label=f"session {peer.session_id}: "
        )
        self._ready.set()
        log.info(
            "session %s with %s open in %.0f ms, %s",
            peer.session_id,
            self.device,
            self.open_seconds * 1000,
            peer.nominated_path() or "unknown path",
        )

    async def _maintain(self) -> None:
        while self.fatal is None:
            bridge = self.bridge
            if bridge is not None:
                reason = await bridge.wait_closed()
                if self.peer is not None:
                    reason = self.peer.path_lost or reason
                self._ready.clear()
                log.warning("tunnel to %s lost: %s; re-establishing", self.device, reason)
                await self._end_session(reason, notify=True)
            await self._recover()

    async def _recover(self) -> None:
        """Re-establish the session: overlapping attempts until one opens or all is lost."""
        loop = asyncio.get_running_loop()
        lost = loop.time()
        timeout = min(
            OPEN_TIMEOUT,
            max(MIN_ATTEMPT_TIMEOUT, ATTEMPT_TIMEOUT_FACTOR * (self._first_open or 0.0)),
        )
        self._backoff.reset()
        attempts: set[asyncio.Task[tuple[PeerSession, RTCDataChannel, float]]] = set()
        next_start = lost
        self._probe_link()
        try:
            while self.fatal is None:
                link_up = self.link.state is LinkState.UP
                if not link_up and not attempts:
                    await self.link.wait_up(None)
                    continue
                now = loop.time()
                if link_up and now >= next_start and len(attempts) < MAX_ATTEMPTS:
                    attempts.add(loop.create_task(self._attempt(timeout)))
                    spacing = RETRY_EVERY
                    if now - lost > FAST_RETRY_WINDOW:
                        spacing = max(spacing, self._backoff.next_delay())
                    next_start = now + spacing
                wait: float | None = max(next_start - now, 0.0 if link_up else RETRY_EVERY)
                if not attempts:
                    await asyncio.sleep(wait or 0.0)
                    continue
                if len(attempts) >= MAX_ATTEMPTS:
                    wait = None  # until one of them ends
                done, _ = await asyncio.wait(
                    attempts, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    attempts.discard(task)
                    if self._judge(task, lost):
                        return
                    self._probe_link()  # no offer came? the link may be dead too
                    if isinstance(task.exception(), (DeviceBusy, DeviceOffline)):
                        # Not a path problem: the device is away or busy; ask less often.
                        next_start = max(next_start, loop.time() + self._backoff.next_delay())
        except (LinkRejected, SignalingRejected) as exc:
            self.fail(SignalingRejected(str(exc)))
        except LinkDown as exc:  # the link gave up for good
            self.fail(SessionFailed(str(exc)))
        finally:
            for task in attempts:
                task.cancel()
            for task in attempts:
                with contextlib.suppress(BaseException):
                    peer, _, _ = await task
                    await self._discard(peer, "another attempt opened first", notify=True)

    def _probe_link(self) -> None:
        probe = self._link_probe
        if probe is None or probe.done():
            self._link_probe = self._tasks.spawn(
                self.link.probe(LINK_PROBE_TIMEOUT), name="signaling probe"
            )

    def _judge(
        self, task: asyncio.Task[tuple[PeerSession, RTCDataChannel, float]], lost: float
    ) -> bool:
        """Adopt a finished attempt if it opened; return whether the tunnel is back."""
        exc = task.exception()
        if exc is None:
            self._adopt(*task.result())
            back = asyncio.get_running_loop().time() - lost
            log.info("tunnel to %s re-established %.1f s after the loss", self.device, back)
            return True
        if isinstance(exc, SignalingRejected):
            self.fail(exc)
        elif isinstance(exc, LinkRejected):
            self.fail(SignalingRejected(str(exc)))
        elif isinstance(exc, (SessionFailed, LinkDown, OSError)):
            log.info("attempt to re-establish the tunnel to %s failed: %s", self.device, exc)
        else:
            raise exc
        return False

    async def _end_session(self, reason: str, *, notify: bool, wait: bool = False) -> None:
        peer, self.peer = self.peer, None
        bridge, self.bridge = self.bridge, None
        self._ready.clear()
        if bridge is not None:
            self.ended_bytes_in += bridge.stats.bytes_in
            self.ended_bytes_out += bridge.stats.bytes_out
            bridge.close(reason)
        if peer is not None:
            await self._discard(peer, reason, notify=notify, wait=wait)

    async def _discard(
        self, peer: PeerSession, reason: str, *, notify: bool, wait: bool = False
    ) -> None:
        if notify and peer.session_id != self._ended_by_device and self.link.state is LinkState.UP:
            with contextlib.suppress(LinkDown):
                await self.link.send(
                    SessionEnd(session=peer.session_id, reason=reason[:MAX_REASON_LEN])
                )
        if wait:
            await peer.close()
        else:
            # Closing deletes TURN allocations, which on a dead path waits for a
            # server that does not answer: nothing on the way to a new session does.
            self._tasks.spawn(peer.close(), name=f"close session {peer.session_id}")

    def _on_refused(self, service: str, code: int, reason: str) -> None:
        essential = self.essential_services
        if code == ResetCode.UNKNOWN_SERVICE and (essential is None or service in essential):
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
        if self._discovery.feed(message):
            return
        session = getattr(message, "session", None)
        if isinstance(message, IceServers):
            # Sent before welcome, so the first session already has them.
            self.issued_ice_servers = message.ice_servers
            log.debug("%d ICE server(s) from the signaling server", len(message.ice_servers))
            return
        if isinstance(message, Error):
            self._on_error(message)
            return
        attempt = self._attempts.get(session) if isinstance(session, str) else None
        if attempt is not None:
            self._on_attempt_signal(attempt, message)
            return
        peer = self.peer
        if peer is not None and session == peer.session_id and isinstance(message, SessionEnd):
            self._ended_by_device = peer.session_id
            log.warning("device %s ended the session: %s", self.device, message.reason)
            if self.bridge is not None:
                self.bridge.close(f"device ended the session: {message.reason}")

    def _on_attempt_signal(self, attempt: _Attempt, message: SignalingMessage) -> None:
        peer = attempt.peer
        if isinstance(message, Offer):
            self._spawn_for(attempt, peer.handle_offer(message.sdp))
        elif isinstance(message, Candidate):
            self._spawn_for(attempt, peer.handle_candidate(message.candidate))
        elif isinstance(message, SessionEnd):
            self._ended_by_device = peer.session_id
            log.info("device %s ended the session: %s", self.device, message.reason)
            _settle(attempt.refused, SessionFailed(f"device ended the session: {message.reason}"))
        elif isinstance(message, PeerLeft):
            _settle(attempt.refused, SessionFailed("device left during negotiation"))

    def _on_error(self, error: Error) -> None:
        log.debug("signaling error %s: %s", error.code, error.message)
        attempt = self._attempts.get(error.session) if error.session else None
        targets = [attempt] if attempt is not None else list(self._attempts.values())
        exc: TunnelError
        if error.code in FATAL_CODES:
            exc = SignalingRejected(_user_words(error.message))
            self.fail(exc)
        elif error.code == "device_offline":
            exc = DeviceOffline(f"device {self.device} is offline")
        elif error.code == "too_many_sessions" and targets:
            exc = DeviceBusy(error.message)
        elif attempt is not None:
            exc = SessionFailed(f"{error.code}: {error.message}")
        elif error.code == "unknown_session":
            # A session_end for an attempt made on a link that has since been remade.
            return
        else:
            log.warning("signaling server: %s: %s", error.code, error.message)
            return
        for target in targets:
            _settle(target.refused, exc)

    def _spawn_for(self, attempt: _Attempt, coro: Coroutine[Any, Any, Any]) -> None:
        async def guarded() -> None:
            try:
                await coro
            except SessionFailed as exc:
                _settle(attempt.refused, exc)

        self._tasks.spawn(guarded(), name=f"session {attempt.peer.session_id} signal")


def _settle(future: asyncio.Future[None], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
        future.exception()  # retrieved: the attempt may be gone already


def _user_words(message: str) -> str:
    """The server's refusal as a user who typed ``connect`` should read it."""
    if "a device may not send" in message:
        return (
            "this token is a device token; connect needs a client token "
            "(tunnelctl token --role client)"
        )
    return (
        message
        if message.startswith("signaling server")
        else f"signaling server refused: {message}"
    )


def _refused_by_server(exc: BaseException) -> bool:
    return isinstance(exc, (DeviceBusy, DeviceOffline, SignalingRejected))


class PortForward:
    """Listen on a local TCP port and carry each connection through the tunnel."""

    def __init__(self, tunnel: ClientTunnel, service: str, host: str, port: int) -> None:
        self.tunnel = tunnel
        self.service = service
        self.host = host
        self.port = port
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
        await carry(self.tunnel, self.service, reader, writer)


async def carry(
    tunnel: ClientTunnel,
    service: str,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """Carry a local connection (a forward's, a handed-off ``--stdio``) to ``service``.

    While the tunnel is being re-established the connection waits up to the
    keepalive; without a tunnel by then it is reset.
    """
    bridge = await tunnel.current_bridge()
    if bridge is None:
        log.warning("no tunnel to %s; resetting a local connection", tunnel.device)
        abort_connection(writer)
        return
    try:
        bridge.attach(service, reader, writer)
    except TunnelError as exc:
        log.warning("cannot open a stream: %s", exc)
        abort_connection(writer)
    except Exception as exc:  # a closed bridge raises LocalProtocolError
        log.warning("cannot open a stream: %s", exc)
        abort_connection(writer)
