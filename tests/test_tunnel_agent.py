"""TunnelAgent against a real in-process signaling server and a real aiortc client peer.

Both peers run in this process on 127.0.0.1 (ICE host allowlist), so these are
"unit" tests of the agent's state machine with the real WebRTC stack under it.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest

from protocol.backoff import Backoff
from protocol.signaling import (
    Candidate,
    Offer,
    SessionEnd,
    SessionRequest,
    SignalingMessage,
    new_session_id,
)
from signaling.auth import issue_token
from signaling.link import LinkState, SignalingLink
from signaling.server import SignalingServer
from workers.errors import SignalingRejected, TunnelUsageError
from workers.peer import PeerSession
from workers.webrtc_client import TunnelAgent

TIMEOUT = 20.0


pytestmark = pytest.mark.usefixtures("loopback_ice")


@pytest.fixture
async def server() -> AsyncIterator[tuple[SignalingServer, str]]:
    secret = secrets.token_hex(32)
    srv = SignalingServer(secret, host="127.0.0.1", port=0)
    await srv.start()
    try:
        yield srv, secret
    finally:
        await srv.close()


class ClientPeer:
    """The answering side, as ``tunnelctl connect`` builds it, driven by hand."""

    def __init__(self, url: str, token: str, device: str) -> None:
        self.device = device
        self.messages: asyncio.Queue[SignalingMessage] = asyncio.Queue()
        self.link = SignalingLink(url, token, self.messages.put_nowait, reconnect=False)
        self.session_id = new_session_id()
        self.peer = PeerSession(self.session_id, self.link.send, channel_protocol="")
        self.received: asyncio.Queue[bytes | str] = asyncio.Queue()

    async def start(self) -> None:
        self.link.start()
        await self.link.wait_up(TIMEOUT)
        await self.link.send(SessionRequest(session=self.session_id, device=self.device))

    async def pump_until_open(self) -> None:
        async def pump() -> None:
            while True:
                message = await self.messages.get()
                if isinstance(message, Offer):
                    await self.peer.handle_offer(message.sdp)
                elif isinstance(message, Candidate):
                    await self.peer.handle_candidate(message.candidate)

        pumping = asyncio.ensure_future(pump())
        try:
            channel = await self.peer.wait_open(TIMEOUT)
        finally:
            pumping.cancel()
        channel.on("message", self.received.put_nowait)

    async def close(self) -> None:
        await self.peer.close()
        await self.link.close()


async def test_lifecycle_offer_answer_and_hello(server: tuple[SignalingServer, str]) -> None:
    srv, secret = server
    agent = TunnelAgent()
    states: list[str] = []
    agent.on_state_change = states.append
    assert agent.state == "new" and not agent.is_connected()

    token = issue_token(secret, sub="local-device-1", role="device")
    await agent.connect(signal_url=srv.url, device_id="local-device-1", token=token)
    assert states == ["connecting"]

    channel = await agent.create_data_channel("http-proxy")
    assert channel.label == "http-proxy"

    client = ClientPeer(
        srv.url,
        issue_token(secret, sub="c1", role="client", devices=["local-device-1"]),
        "local-device-1",
    )
    await client.start()
    offer = await asyncio.wait_for(agent.create_offer(), TIMEOUT)
    assert offer.type == "offer" and "a=candidate:" in offer.sdp and "127.0.0.1" in offer.sdp
    assert agent.session_id == client.session_id and agent.client_id == "c1"

    await client.pump_until_open()
    await agent.wait_connected(TIMEOUT)
    assert agent.is_connected()
    assert states[:2] == ["connecting", "connected"]

    await agent.send_data("Hello!")
    assert await asyncio.wait_for(client.received.get(), TIMEOUT) == "Hello!"

    echoed: asyncio.Queue[bytes | str] = asyncio.Queue()
    agent.on_message = echoed.put_nowait
    assert client.peer.channel is not None
    client.peer.channel.send(b"\x00binary\xff")
    assert await asyncio.wait_for(echoed.get(), TIMEOUT) == b"\x00binary\xff"

    await agent.disconnect()
    assert agent.state == "closed" and states[-1] == "closed"
    assert not agent.is_connected()
    end = await asyncio.wait_for(_next_of(client.messages, SessionEnd), TIMEOUT)
    assert end.session == client.session_id
    await client.close()


async def _next_of(queue: asyncio.Queue[SignalingMessage], kind: type[SessionEnd]) -> SessionEnd:
    while True:
        message = await queue.get()
        if isinstance(message, kind):
            return message


async def test_bad_token_fails_cleanly(server: tuple[SignalingServer, str]) -> None:
    srv, _ = server
    agent = TunnelAgent()
    states: list[str] = []
    agent.on_state_change = states.append
    bad = issue_token("x" * 64, sub="local-device-1", role="device")
    with pytest.raises(SignalingRejected, match="signature"):
        await agent.connect(signal_url=srv.url, device_id="local-device-1", token=bad)
    assert states == ["failed"]


async def test_device_token_for_another_id_cannot_register(
    server: tuple[SignalingServer, str],
) -> None:
    srv, secret = server
    agent = TunnelAgent()
    token = issue_token(secret, sub="other-device", role="device")
    with pytest.raises(SignalingRejected):
        await agent.connect(
            signal_url=srv.url, device_id="local-device-1", token=token, timeout=TIMEOUT
        )
    assert agent.state == "failed"


async def test_api_misuse_is_a_usage_error(server: tuple[SignalingServer, str]) -> None:
    srv, secret = server
    agent = TunnelAgent()
    with pytest.raises(TunnelUsageError):
        await agent.create_data_channel("x")
    with pytest.raises(TunnelUsageError):
        await agent.send_data("too early")
    await agent.connect(
        srv.url, "local-device-1", issue_token(secret, sub="local-device-1", role="device")
    )
    with pytest.raises(TunnelUsageError):
        await agent.connect(srv.url, "local-device-1", "t")
    with pytest.raises(TunnelUsageError):
        await agent.create_offer()
    await agent.create_data_channel("x")
    with pytest.raises(TunnelUsageError):
        await agent.create_data_channel("y")
    with pytest.raises(TunnelUsageError):
        await agent.send_data("not open yet")
    await agent.disconnect()
    assert agent.state == "closed"


async def test_signaling_link_reconnects_and_registers_after_a_server_restart(
    server: tuple[SignalingServer, str],
) -> None:
    srv, secret = server
    states: asyncio.Queue[LinkState] = asyncio.Queue()
    requests: asyncio.Queue[SignalingMessage] = asyncio.Queue()
    link = SignalingLink(
        srv.url,
        issue_token(secret, sub="dev-r", role="device"),
        requests.put_nowait,
        device="dev-r",
        on_state=states.put_nowait,
        backoff=Backoff(base=0.05, cap=0.2, floor=0.01),
    )
    link.start()
    await link.wait_up(TIMEOUT)
    while not states.empty():  # forget the first connection's states
        states.get_nowait()
    port = srv.port
    await srv.close()
    restarted = SignalingServer(secret, host="127.0.0.1", port=port)
    await restarted.start()
    try:
        seen = []
        async with asyncio.timeout(TIMEOUT):
            while len(seen) < 2 or seen[-1] is not LinkState.UP:
                seen.append(await states.get())
        assert LinkState.DOWN in seen  # it noticed, backed off and came back
        # Registered again: a client's request reaches the device through the new server.
        client = SignalingLink(
            restarted.url,
            issue_token(secret, sub="c", role="client", devices=["dev-r"]),
            lambda m: None,
        )
        client.start()
        await client.wait_up(TIMEOUT)
        session = new_session_id()
        await client.send(SessionRequest(session=session, device="dev-r"))
        request = await asyncio.wait_for(requests.get(), TIMEOUT)
        assert isinstance(request, SessionRequest) and request.session == session
        await client.close()
    finally:
        await link.close()
        await restarted.close()


async def test_a_dead_path_reports_failed_within_the_keepalive(
    server: tuple[SignalingServer, str],
) -> None:
    srv, secret = server
    agent = TunnelAgent(keepalive=1.0)
    failed = asyncio.Event()
    agent.on_state_change = lambda state: failed.set() if state == "failed" else None
    await agent.connect(
        signal_url=srv.url,
        device_id="dev-k",
        token=issue_token(secret, sub="dev-k", role="device"),
    )
    await agent.create_data_channel("tunnel")
    client = ClientPeer(
        srv.url, issue_token(secret, sub="c1", role="client", devices=["dev-k"]), "dev-k"
    )
    try:
        await client.start()
        await asyncio.wait_for(agent.create_offer(), TIMEOUT)
        await client.pump_until_open()
        await agent.wait_connected(TIMEOUT)
        assert agent.path_lost is None
        # The client stops answering ICE, as a peer behind a dead path does.
        assert client.peer.pc.sctp is not None
        connection = client.peer.pc.sctp.transport.transport._connection
        connection.request_received = lambda *args: None
        await asyncio.wait_for(failed.wait(), TIMEOUT)
        assert agent.state == "failed" and not agent.is_connected()
        assert agent.path_lost == "path lost: no answer from the peer for 1 s"
    finally:
        await client.close()
        await agent.disconnect()
