"""The device side of tunnels: answers session requests, serves configured services.

:class:`DeviceHost` keeps the device's signaling link, and for each session
request from a client it makes a :class:`PeerSession` (the device offers and
creates the DataChannel, PROTOCOL.md §2.1) and a :class:`TunnelBridge` that
connects streams to the device's configured services and nothing else.

Sessions run in this process for now; the supervisor (ARCHITECTURE.md) moves
each into a worker process of its own without changing this contract.

Contract: ``await start()`` (returns once registered, raises
:class:`SignalingRejected` for a refused token), ``await run()`` until stopped,
``await stop()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from protocol.frames import is_valid_service_name
from protocol.mux import Role
from protocol.signaling import (
    Answer,
    Candidate,
    Error,
    PeerLeft,
    SessionEnd,
    SessionRequest,
    SignalingMessage,
)
from signaling.errors import LinkDown, LinkRejected
from signaling.link import LinkState, SignalingLink
from workers.bridge import ServiceAddress, TunnelBridge
from workers.errors import SessionFailed, SignalingRejected
from workers.ice import IceServer
from workers.peer import PeerSession
from workers.tasks import TaskSet

log = logging.getLogger("tunnelctl.device")

OPEN_TIMEOUT = 30.0
MAX_SESSIONS = 64
_SCHEMES = {"http": 80, "https": 443, "tcp": None, "ws": 80, "wss": 443}


def parse_expose(spec: str) -> tuple[str, ServiceAddress]:
    """Parse ``NAME=URL`` (``web=http://127.0.0.1:8080``, ``ssh=tcp://127.0.0.1:22``)."""
    name, sep, url = spec.partition("=")
    if not sep:
        raise ValueError(
            f"bad --expose {spec!r}: expected NAME=URL, e.g. web=http://127.0.0.1:8080"
        )
    if not is_valid_service_name(name):
        raise ValueError(f"bad service name {name!r}: use letters, digits, '.', '_', '-' (max 64)")
    if re.fullmatch(r"[^:/]+:\d+", url):
        url = "tcp://" + url
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES:
        raise ValueError(f"bad service URL {url!r}: scheme must be one of {', '.join(_SCHEMES)}")
    try:
        port = parts.port or _SCHEMES[parts.scheme]
    except ValueError:
        raise ValueError(f"bad service URL {url!r}: bad port") from None
    if not parts.hostname or port is None:
        raise ValueError(f"bad service URL {url!r}: needs a host and a port")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"bad service URL {url!r}: a service is a host and port, no path")
    return name, ServiceAddress(parts.hostname, port)


@dataclass(eq=False)
class DeviceSession:
    session_id: str
    client: str
    peer: PeerSession
    bridge: TunnelBridge | None = None


class DeviceHost:
    """A device registered with the signaling server, serving its sessions."""

    def __init__(
        self,
        *,
        signal_url: str,
        device: str,
        token: str,
        services: Mapping[str, ServiceAddress],
        ice_servers: Sequence[IceServer] = (),
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        if not services:
            raise ValueError("a device needs at least one service to expose")
        self.device = device
        self.services = dict(services)
        self.ice_servers = tuple(ice_servers)
        self.max_sessions = max_sessions
        self.sessions: dict[str, DeviceSession] = {}
        self.link = SignalingLink(
            signal_url, token, self._on_signal, device=device, on_state=self._on_link_state
        )
        self._tasks = TaskSet(log)
        # One consumer keeps each session's messages in arrival order.
        self._inbox: asyncio.Queue[SignalingMessage] = asyncio.Queue(maxsize=1024)

    async def start(self, timeout: float = 30.0) -> None:
        self._tasks.spawn(self._dispatch(), name=f"device {self.device} dispatch")
        self.link.start()
        try:
            await self.link.wait_up(timeout)
        except LinkRejected as exc:
            raise SignalingRejected(str(exc)) from None
        except LinkDown as exc:
            raise SessionFailed(str(exc)) from None
        log.info(
            "device %s registered, exposing %s",
            self.device,
            ", ".join(f"{n}={a.host}:{a.port}" for n, a in self.services.items()),
        )

    async def run(self) -> None:
        try:
            await self.link.run_until_closed()
        except LinkRejected as exc:
            raise SignalingRejected(str(exc)) from None

    async def stop(self) -> None:
        for session in list(self.sessions.values()):
            await self._end(session, "device shutting down", notify=True)
        await self.link.close()
        await self._tasks.cancel_all()

    # -- signaling ----------------------------------------------------------

    def _on_link_state(self, state: LinkState) -> None:
        if state is LinkState.DOWN:
            log.warning(
                "device %s: signaling link down; %d established session(s) keep running",
                self.device,
                len(self.sessions),
            )

    def _on_signal(self, message: SignalingMessage) -> None:
        try:
            self._inbox.put_nowait(message)
        except asyncio.QueueFull:
            log.warning("device %s: dropping a signaling message, inbox full", self.device)

    async def _dispatch(self) -> None:
        while True:
            message = await self._inbox.get()
            if isinstance(message, SessionRequest):
                self._tasks.spawn(self._new_session(message), name=f"session {message.session}")
            else:
                await self._handle(message)

    async def _handle(self, message: SignalingMessage) -> None:
        if isinstance(message, Error):
            log.warning(
                "device %s: signaling error %s: %s", self.device, message.code, message.message
            )
            if message.session is not None and message.session in self.sessions:
                await self._end(self.sessions[message.session], message.message, notify=False)
            return
        session_id = getattr(message, "session", None)
        session = self.sessions.get(session_id) if isinstance(session_id, str) else None
        if session is None:
            return
        try:
            if isinstance(message, Answer):
                await session.peer.handle_answer(message.sdp)
            elif isinstance(message, Candidate):
                await session.peer.handle_candidate(message.candidate)
            elif isinstance(message, SessionEnd):
                log.info("session %s ended by the client: %s", session.session_id, message.reason)
                await self._end(session, message.reason, notify=False)
            elif isinstance(message, PeerLeft) and session.bridge is None:
                await self._end(session, "client left during negotiation", notify=False)
        except SessionFailed as exc:
            await self._end(session, str(exc), notify=True)

    async def _new_session(self, request: SessionRequest) -> None:
        if len(self.sessions) >= self.max_sessions:
            await self._send_quietly(
                SessionEnd(session=request.session, reason="device is at its session limit")
            )
            return
        if request.session in self.sessions:
            return
        peer = PeerSession(request.session, self.link.send, ice_servers=self.ice_servers)
        session = DeviceSession(request.session, request.client or "?", peer)
        self.sessions[request.session] = session
        log.info("session %s: client %s connecting", request.session, session.client)
        try:
            await peer.start_offer()
            channel = await peer.wait_open(OPEN_TIMEOUT)
        except SessionFailed as exc:
            log.warning("session %s failed: %s", request.session, exc)
            await self._end(session, str(exc), notify=True)
            return
        if session.session_id not in self.sessions:
            return
        session.bridge = TunnelBridge(
            channel, Role.DEVICE, services=self.services, label=f"session {request.session}: "
        )
        log.info("session %s: DataChannel open (%s)", request.session, peer.candidate_pair_type())
        reason = await session.bridge.wait_closed()
        await self._end(session, reason, notify=True)

    async def _end(self, session: DeviceSession, reason: str, *, notify: bool) -> None:
        if self.sessions.pop(session.session_id, None) is None:
            return
        log.info("session %s ended: %s", session.session_id, reason)
        if session.bridge is not None:
            session.bridge.close(reason)
        await session.peer.close()
        if notify:
            await self._send_quietly(SessionEnd(session=session.session_id, reason=reason[:200]))

    async def _send_quietly(self, message: SignalingMessage) -> None:
        with contextlib.suppress(LinkDown):
            await self.link.send(message)
