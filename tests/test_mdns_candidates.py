"""A browser's mDNS (``.local``) host candidates do not hold up a session
(workers/aiortc_tuning.py, ``_skip_mdns_resolution``).

The client here is a real aiortc peer whose answer hides its host candidate
behind an mDNS name, as Chromium's answer does by default; it connects
through the peer-reflexive candidate that its own checks reveal.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator

import aioice
import aioice.ice
import pytest

from protocol.signaling import Answer, SignalingMessage
from workers import aiortc_tuning
from workers.peer import PeerSession

TIMEOUT = 20.0

pytestmark = pytest.mark.usefixtures("loopback_ice")


class Outbox:
    def __init__(self) -> None:
        self.messages: list[SignalingMessage] = []

    async def send(self, message: SignalingMessage) -> None:
        self.messages.append(message)


@pytest.fixture
async def peers() -> AsyncIterator[tuple[PeerSession, PeerSession, Outbox]]:
    assert aiortc_tuning.install()
    device = PeerSession("s-mdns-test-1", Outbox().send)
    client_out = Outbox()
    client = PeerSession("s-mdns-test-1", client_out.send)
    yield device, client, client_out
    await device.close()
    await client.close()


def ice(peer: PeerSession) -> aioice.Connection:
    assert peer.pc.sctp is not None
    connection: aioice.Connection = peer.pc.sctp.transport.transport._connection
    return connection


def hide_host_addresses(sdp: str) -> tuple[str, int]:
    """The SDP with each host candidate's address replaced by an mDNS name."""
    hidden = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal hidden
        hidden += 1
        return f"{match.group(1)}{uuid.uuid4()}.local{match.group(3)}"

    pattern = r"(a=candidate:\S+ \d \S+ \d+ )(\S+)( \d+ typ host)"
    return re.sub(pattern, replace, sdp), hidden


async def test_a_browsers_mdns_candidates_are_not_resolved_and_the_session_opens(
    peers: tuple[PeerSession, PeerSession, Outbox],
) -> None:
    device, client, client_out = peers
    await client.handle_offer(await device.start_offer())
    answer = client_out.messages[0]
    assert isinstance(answer, Answer)
    sdp, hidden = hide_host_addresses(answer.sdp)
    assert hidden >= 1 and ".local " in sdp

    await device.handle_answer(sdp)
    # Stock aioice returns from here only once every name is resolved or timed
    # out (1 s each, ICE not even started); here they are still held.
    assert ice(device)._remote_candidates_resolving == hidden
    assert all(c.type == "prflx" for c in ice(device).remote_candidates)

    await asyncio.gather(device.wait_open(TIMEOUT), client.wait_open(TIMEOUT))
    path = device.nominated_path()
    assert path is not None and path.pair == "host/prflx"
    # No multicast query was sent: aioice's mDNS socket was never opened.
    assert getattr(aioice.ice._mdns, "protocol", None) is None


async def test_end_of_candidates_waits_for_the_held_mdns_candidates(
    peers: tuple[PeerSession, PeerSession, Outbox],
) -> None:
    device, client, client_out = peers
    await client.handle_offer(await device.start_offer())
    answer = client_out.messages[0]
    assert isinstance(answer, Answer)
    sdp, hidden = hide_host_addresses(answer.sdp)
    await device.handle_answer(sdp)
    await device.handle_candidate(None)
    connection = ice(device)
    # Not yet ended: ICE must not fail before the browser's checks can arrive.
    assert connection._remote_candidates_end
    assert connection._remote_candidates_resolving == hidden
    await asyncio.gather(device.wait_open(TIMEOUT), client.wait_open(TIMEOUT))
