"""``TunnelAgent``: the embeddable API for a program that is one tunnel's device end.

A program calls :meth:`TunnelAgent.connect` with its device id and token; the
agent registers with the signaling server (keeping the link up with capped,
jittered backoff), :meth:`create_data_channel` prepares the channel,
:meth:`create_offer` waits for a client to ask for a session and sends it the
offer (the device is the offering peer, ARCHITECTURE.md step 4), and the agent
reports the connection's lifecycle through :attr:`on_state_change`::

    agent = TunnelAgent()
    agent.on_state_change = on_state_change
    await agent.connect(signal_url="ws://localhost:8000/signal",
                        device_id="local-device-1", token=jwt)
    channel = await agent.create_data_channel("http-proxy")
    offer = await agent.create_offer()
    while not agent.is_connected():
        await asyncio.sleep(1)
    await agent.send_data("Hello!")
    await agent.disconnect()

States (``agent.state``, passed to ``on_state_change``) follow the W3C
``RTCPeerConnectionState``: ``new`` → ``connecting`` → ``connected``, then
``disconnected`` / ``failed`` / ``closed``. A refused token sets ``failed`` and
raises :class:`SignalingRejected` from ``connect``. A path that stops
answering sets ``failed`` within ``keepalive`` seconds (default 5; ICE consent,
RFC 7675), and :attr:`path_lost` says so.

The agent serves one session at a time; ``tunnelctl start`` serves many through
the supervisor (one worker process per session, :mod:`workers.session_worker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from aiortc import RTCDataChannel, RTCSessionDescription

from aio.tasks import TaskSet
from protocol.ice import DEFAULT_KEEPALIVE, IceServer
from protocol.signaling import (
    Answer,
    Candidate,
    Error,
    IceServers,
    PeerLeft,
    SessionEnd,
    SessionRequest,
    SignalingMessage,
)
from signaling.errors import LinkDown, LinkRejected
from signaling.link import SignalingLink
from workers.errors import SessionFailed, SignalingRejected, TunnelUsageError
from workers.peer import PeerSession

log = logging.getLogger("tunnelctl.agent")


class TunnelAgent:
    """The device end of one WebRTC tunnel, negotiated through our signaling server."""

    def __init__(
        self,
        ice_servers: Sequence[IceServer] = (),
        *,
        channel_protocol: str = "",
        keepalive: float = DEFAULT_KEEPALIVE,
    ) -> None:
        self.ice_servers = tuple(ice_servers)
        self._issued_ice_servers: tuple[IceServer, ...] = ()  # from the signaling server
        self.keepalive = keepalive
        self.channel_protocol = channel_protocol
        self.on_state_change: Callable[[str], None] | None = None
        self.on_message: Callable[[bytes | str], None] | None = None
        self.state = "new"
        self.session_id: str | None = None
        self.client_id: str | None = None
        self._link: SignalingLink | None = None
        self._peer: PeerSession | None = None
        self._channel: RTCDataChannel | None = None
        self._requests: asyncio.Queue[SessionRequest] = asyncio.Queue(maxsize=16)
        self._tasks = TaskSet(log)

    # -- the original API ---------------------------------------------------

    async def connect(
        self, signal_url: str, device_id: str, token: str, *, timeout: float = 30.0
    ) -> None:
        """Register as ``device_id`` with the signaling server at ``signal_url``."""
        if self._link is not None:
            raise TunnelUsageError("connect() was already called")
        self._link = SignalingLink(signal_url, token, self._on_signal, device=device_id)
        self._link.start()
        try:
            await self._link.wait_up(timeout)
        except (LinkRejected, LinkDown) as exc:
            self._set_state("failed")
            await self._link.close()
            kind = SignalingRejected if isinstance(exc, LinkRejected) else SessionFailed
            raise kind(str(exc)) from None
        self._set_state("connecting")

    async def create_data_channel(self, label: str) -> RTCDataChannel:
        """Create the DataChannel the next session will carry."""
        link = self._require_link()
        if self._peer is not None:
            raise TunnelUsageError("a data channel was already created for this session")
        self._peer = PeerSession(
            "",
            link.send,
            ice_servers=self.ice_servers + self._issued_ice_servers,
            on_state=self._on_peer_state,
            channel_protocol=self.channel_protocol,
            keepalive=self.keepalive,
        )
        channel = self._peer.create_channel(label)
        channel.on("message", self._deliver)
        self._channel = channel
        return channel

    async def create_offer(self, timeout: float | None = None) -> RTCSessionDescription:
        """Wait for a client's session request, send it the offer, and return the offer."""
        self._require_link()
        if self._peer is None or self._channel is None:
            raise TunnelUsageError("call create_data_channel() before create_offer()")
        request = await asyncio.wait_for(self._requests.get(), timeout)
        self.session_id = self._peer.session_id = request.session
        self.client_id = request.client
        sdp = await self._peer.start_offer()
        return RTCSessionDescription(sdp=sdp, type="offer")

    async def wait_connected(self, timeout: float) -> None:
        """Wait until the DataChannel is open (an event, instead of polling ``is_connected``)."""
        if self._peer is None:
            raise TunnelUsageError("call create_data_channel() first")
        await self._peer.wait_open(timeout)

    @property
    def path_lost(self) -> str | None:
        """Why the session's path died, or ``None`` if it did not."""
        return self._peer.path_lost if self._peer is not None else None

    def is_connected(self) -> bool:
        return (
            self.state == "connected"
            and self._channel is not None
            and self._channel.readyState == "open"
        )

    async def send_data(self, data: bytes | str) -> None:
        """Send one message on the DataChannel."""
        if self._channel is None or self._channel.readyState != "open":
            raise TunnelUsageError("the data channel is not open")
        self._channel.send(data)

    async def disconnect(self) -> None:
        """End the session (telling the client) and leave the signaling server."""
        if self._peer is not None:
            if self.session_id and self._link is not None:
                with contextlib.suppress(LinkDown):
                    await self._link.send(
                        SessionEnd(session=self.session_id, reason="device disconnected")
                    )
            await self._peer.close()
        if self._link is not None:
            await self._link.close()
        await self._tasks.cancel_all()
        self._set_state("closed")

    # -- internals ------------------------------------------------------------

    def _require_link(self) -> SignalingLink:
        if self._link is None:
            raise TunnelUsageError("call connect() first")
        return self._link

    def _deliver(self, message: bytes | str) -> None:
        if self.on_message is not None:
            self.on_message(message)

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            if self.on_state_change is not None:
                self.on_state_change(state)

    def _on_peer_state(self, state: str) -> None:
        if state != "new":
            self._set_state(state)

    def _on_signal(self, message: SignalingMessage) -> None:
        if isinstance(message, IceServers):
            self._issued_ice_servers = message.ice_servers
            return
        if isinstance(message, SessionRequest):
            if self.session_id is None:
                with contextlib.suppress(asyncio.QueueFull):
                    self._requests.put_nowait(message)
            else:
                log.info("busy with session %s; refusing %s", self.session_id, message.session)
                self._spawn(self._refuse(message.session))
            return
        if isinstance(message, Error):
            log.warning("signaling error %s: %s", message.code, message.message)
            return
        peer = self._peer
        if peer is None or getattr(message, "session", None) != self.session_id:
            return
        if isinstance(message, Answer):
            self._spawn(self._guard(peer.handle_answer(message.sdp)))
        elif isinstance(message, Candidate):
            self._spawn(self._guard(peer.handle_candidate(message.candidate)))
        elif isinstance(message, SessionEnd):
            self._spawn(peer.close())
        elif isinstance(message, PeerLeft) and not self.is_connected():
            self._set_state("failed")

    async def _guard(self, coro: Coroutine[Any, Any, Any]) -> None:
        try:
            await coro
        except SessionFailed as exc:
            log.warning("session %s: %s", self.session_id, exc)
            self._set_state("failed")

    async def _refuse(self, session: str) -> None:
        if self._link is not None:
            with contextlib.suppress(LinkDown):
                await self._link.send(SessionEnd(session=session, reason="device busy"))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._tasks.spawn(coro)
