"""workers.aiortc_tuning, with two real aiortc peers in this process on 127.0.0.1.

Each test makes one side misbehave the way a real path does (a peer that stops
answering, a NAT that drops the first check, a STUN server that never answers)
and checks the tuned behaviour. Times are printed, not asserted, except where
the bound is the feature (an unreachable STUN server must not cost aioice's 5 s).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aioice
import aiortc
import pytest

from protocol.signaling import Answer, SignalingMessage
from workers import aiortc_tuning
from workers.ice import IceServer
from workers.peer import PeerSession

TIMEOUT = 20.0

pytestmark = pytest.mark.usefixtures("loopback_ice")


class Outbox:
    def __init__(self) -> None:
        self.messages: list[SignalingMessage] = []

    async def send(self, message: SignalingMessage) -> None:
        self.messages.append(message)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[PeerSession, PeerSession, Outbox]]:
    device = PeerSession("s-tuning-test-1", Outbox().send, keepalive=1.0)
    client_out = Outbox()
    client = PeerSession("s-tuning-test-1", client_out.send, keepalive=1.0)
    yield device, client, client_out
    await device.close()
    await client.close()


async def negotiate(device: PeerSession, client: PeerSession, client_out: Outbox) -> None:
    await client.handle_offer(await device.start_offer())
    answer = client_out.messages[0]
    assert isinstance(answer, Answer)
    await device.handle_answer(answer.sdp)


def ice(peer: PeerSession) -> aioice.Connection:
    assert peer.pc.sctp is not None
    connection: aioice.Connection = peer.pc.sctp.transport.transport._connection
    return connection


def test_the_installed_versions_are_verified_and_tuned() -> None:
    assert aiortc_tuning.versions_verified(), (aioice.__version__, aiortc.__version__)
    assert aiortc_tuning.install() is True
    assert aiortc_tuning.install() is True  # once per process, then the same answer


async def test_a_peer_that_stops_answering_fails_the_session_within_its_keepalive(
    pair: tuple[PeerSession, PeerSession, Outbox],
) -> None:
    device, client, client_out = pair
    failed = asyncio.Event()
    device._on_state = lambda state: failed.set() if state == "failed" else None
    await negotiate(device, client, client_out)
    await asyncio.gather(device.wait_open(TIMEOUT), client.wait_open(TIMEOUT))
    assert device.path_lost is None
    # The client goes silent: every STUN request it receives is dropped, as on a dead path.
    ice(client).request_received = lambda *args: None  # type: ignore[method-assign]
    silent = time.monotonic()
    await asyncio.wait_for(failed.wait(), TIMEOUT)
    print(f"\nsilent peer noticed after {time.monotonic() - silent:.2f} s (keepalive 1 s)")
    assert device.path_lost == "path lost: no answer from the peer for 1 s"
    assert device.channel is not None and device.channel.readyState in ("closing", "closed")


async def test_a_check_the_peers_nat_dropped_is_sent_again_when_the_peer_checks(
    pair: tuple[PeerSession, PeerSession, Outbox],
) -> None:
    device, client, client_out = pair
    # The device's NAT drops the first check that reaches it: the device has not
    # sent anything to the client yet, so no mapping lets it in.
    device.create_channel()
    device_ice = ice(device)
    real_request_received = device_ice.request_received
    dropped: list[tuple[str, int]] = []  # where the dropped check was sent to

    def nat_filter(message: Any, addr: tuple[str, int], protocol: Any) -> None:
        if not dropped:
            dropped.append((protocol.local_candidate.host, protocol.local_candidate.port))
            return
        real_request_received(message, addr, protocol)

    device_ice.request_received = nat_filter  # type: ignore[method-assign]
    handling = False
    resent_on_check: list[tuple[str, int]] = []

    def check_incoming(message: Any, addr: tuple[str, int], protocol: Any) -> None:
        nonlocal handling
        handling = True
        try:
            aioice.Connection.check_incoming(client_ice, message, addr, protocol)
        finally:
            handling = False

    started = time.monotonic()
    await client.handle_offer(await device.start_offer())
    # Record the client's requests sent while it handles the device's check (the
    # device checks only once it has the answer, sent below).
    client_ice = ice(client)
    client_ice.check_incoming = check_incoming  # type: ignore[method-assign]
    for protocol in client_ice._protocols:
        real_send = protocol.send_stun

        def send_stun(message: Any, addr: tuple[str, int], real: Any = real_send) -> None:
            if handling and message.message_class == aioice.stun.Class.REQUEST:
                resent_on_check.append(addr)
            real(message, addr)

        protocol.send_stun = send_stun  # type: ignore[method-assign]
    answer = client_out.messages[0]
    assert isinstance(answer, Answer)
    await device.handle_answer(answer.sdp)
    await asyncio.gather(device.wait_open(TIMEOUT), client.wait_open(TIMEOUT))
    print(f"\nopen in {(time.monotonic() - started) * 1000:.0f} ms with the first check dropped")
    assert dropped, "the client's first check never reached the device"
    assert resent_on_check == [dropped[0]]


async def test_an_unreachable_stun_server_delays_the_offer_by_the_bound_only() -> None:
    # A UDP socket that never answers: a STUN server behind a firewall that drops.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
        hole.bind(("127.0.0.1", 0))
        port = hole.getsockname()[1]
        peer = PeerSession(
            "s-tuning-test-2", Outbox().send, ice_servers=[IceServer(f"stun:127.0.0.1:{port}")]
        )
        try:
            started = time.monotonic()
            sdp = await asyncio.wait_for(peer.prepare_offer(), TIMEOUT)
            took = time.monotonic() - started
        finally:
            await peer.close()
    print(f"\noffer with an unreachable STUN server in {took:.2f} s")
    assert "typ host" in sdp and "typ srflx" not in sdp
    assert took < 5.0  # aioice alone waits 5 s; the bound is STUN_TIMEOUT


async def test_a_server_failing_at_every_gathering_is_warned_about_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An idle worker re-gathers every 20 s: behind a firewall the same server fails
    each time, and the log says so once (WARNING), not three times a minute."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
        hole.bind(("127.0.0.1", 0))
        url = f"stun:127.0.0.1:{hole.getsockname()[1]}"
        with caplog.at_level(logging.DEBUG, logger="tunnelctl.ice"):
            for _ in range(2):
                peer = PeerSession("s-tuning-test-3", Outbox().send, ice_servers=[IceServer(url)])
                try:
                    await asyncio.wait_for(peer.prepare_offer(), TIMEOUT)
                finally:
                    await peer.close()
    about = [r for r in caplog.records if url in r.getMessage()]
    assert [r.levelno for r in about] == [logging.WARNING, logging.DEBUG], about


@pytest.mark.e2e
async def test_a_stun_server_that_never_answers_waits_no_longer_than_the_relay(
    tmp_path: Any,
) -> None:
    """UDP blocked, TURN over TCP the way out: once the relay is allocated, a STUN
    lookup still pending is not waited for (it would cost STUN_TIMEOUT per offer)."""
    from protocol.ice import turn_rest_credential
    from tests.e2e.turn_support import TURN_SECRET, Coturn, have_coturn

    if not have_coturn():
        pytest.skip("needs coturn's turnserver (apt-get install coturn)")
    coturn = Coturn(tmp_path)
    try:
        coturn.wait_ready(TIMEOUT)
        username, password = turn_rest_credential(TURN_SECRET, int(time.time()) + 600, "t")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
            hole.bind(("127.0.0.1", 0))
            servers = [
                IceServer(f"stun:127.0.0.1:{hole.getsockname()[1]}"),
                IceServer(f"turn:127.0.0.1:{coturn.port}?transport=tcp", username, password),
            ]
            peer = PeerSession("s-tuning-test-3", Outbox().send, ice_servers=servers)
            try:
                started = time.monotonic()
                sdp = await asyncio.wait_for(peer.prepare_offer(), TIMEOUT)
                took = time.monotonic() - started
            finally:
                await peer.close()
    finally:
        coturn.stop()
    print(f"\noffer with a relay and a silent STUN server in {took * 1000:.0f} ms")
    assert "typ relay" in sdp and "typ srflx" not in sdp
    assert took < aiortc_tuning.STUN_TIMEOUT


def _channel_bind_error(code: int, reason: str) -> aioice.stun.TransactionFailed:
    response = aioice.stun.Message(
        message_method=aioice.stun.Method.CHANNEL_BIND,
        message_class=aioice.stun.Class.ERROR,
    )
    response.attributes["ERROR-CODE"] = (code, reason)
    return aioice.stun.TransactionFailed(response)


@pytest.mark.parametrize(("code", "lost"), [(403, False), (437, True), (400, True)])
async def test_a_refused_peer_address_is_not_a_lost_allocation(code: int, lost: bool) -> None:
    """403 refuses one peer address (coturn's denied ranges); 437/400 mean the
    server no longer knows this allocation (RFC 8656 §12)."""
    reported: list[tuple[str, str]] = []
    protocol = aioice.ice.StunProtocol(aioice.Connection(ice_controlling=True))
    protocol.tunnelctl_relay_transport = "udp"  # type: ignore[attr-defined]
    protocol.tunnelctl_url = "turn:203.0.113.1:3478"  # type: ignore[attr-defined]
    protocol.receiver.tunnelctl_on_relay_lost = lambda url, why: reported.append((url, why))  # type: ignore[attr-defined]
    protocol.error_received(_channel_bind_error(code, "x"))
    assert bool(reported) is lost, reported


async def test_an_allocation_lost_before_anyone_watches_is_reported_when_watched() -> None:
    """Lost while gathering: the watcher installed afterwards still hears of it."""
    protocol = aioice.ice.StunProtocol(aioice.Connection(ice_controlling=True))
    protocol.tunnelctl_relay_transport = "tcp"  # type: ignore[attr-defined]
    protocol.tunnelctl_url = "turn:203.0.113.1:3478?transport=tcp"  # type: ignore[attr-defined]
    protocol.connection_lost(ConnectionResetError(104, "Connection reset by peer"))
    reported = aiortc_tuning.lost_relays(protocol.receiver)
    assert [url for url, _ in reported] == ["turn:203.0.113.1:3478?transport=tcp"]
    assert "connection to the server lost" in reported[0][1]
