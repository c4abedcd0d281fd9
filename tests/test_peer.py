"""PeerSession's SDP and trickle-ICE handling, with two real aiortc peers on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from protocol.signaling import Answer, Candidate, IceCandidate, Offer, SignalingMessage
from workers.errors import SessionFailed
from workers.peer import CHANNEL_PROTOCOL, PeerSession

TIMEOUT = 20.0


pytestmark = pytest.mark.usefixtures("loopback_ice")


class Outbox:
    def __init__(self) -> None:
        self.messages: list[SignalingMessage] = []

    async def send(self, message: SignalingMessage) -> None:
        self.messages.append(message)


@pytest.fixture
async def peers() -> AsyncIterator[tuple[PeerSession, Outbox, PeerSession, Outbox]]:
    dev_out, cli_out = Outbox(), Outbox()
    device = PeerSession("s-peer-test-1", dev_out.send)
    client = PeerSession("s-peer-test-1", cli_out.send)
    yield device, dev_out, client, cli_out
    await device.close()
    await client.close()


def split_candidates(sdp: str) -> tuple[str, list[IceCandidate]]:
    """Take the candidates out of an SDP, as a trickling peer would send them."""
    lines, candidates = [], []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            candidates.append(IceCandidate(candidate=line[2:], sdp_mid="0", sdp_mline_index=0))
        elif line != "a=end-of-candidates":
            lines.append(line)
    return "\r\n".join(lines) + "\r\n", candidates


async def test_offer_answer_exchange_opens_the_channel(
    peers: tuple[PeerSession, Outbox, PeerSession, Outbox],
) -> None:
    device, dev_out, client, cli_out = peers
    sdp = await device.start_offer()
    assert [type(m) for m in dev_out.messages] == [Offer, Candidate]
    assert isinstance(dev_out.messages[1], Candidate) and dev_out.messages[1].candidate is None
    await client.handle_offer(sdp)
    answer = cli_out.messages[0]
    assert isinstance(answer, Answer) and answer.session == "s-peer-test-1"
    await device.handle_answer(answer.sdp)
    dev_channel, cli_channel = await asyncio.gather(
        device.wait_open(TIMEOUT), client.wait_open(TIMEOUT)
    )
    assert dev_channel.protocol == cli_channel.protocol == CHANNEL_PROTOCOL
    path = device.nominated_path()
    assert path is not None
    assert (path.path, path.pair, path.relay_transport) == ("direct", "host/host", None)
    assert device.state == "connected"


async def test_trickled_candidates_before_and_after_the_description_connect(
    peers: tuple[PeerSession, Outbox, PeerSession, Outbox],
) -> None:
    device, _, client, cli_out = peers
    bare_offer, candidates = split_candidates(await device.start_offer())
    assert candidates, "aiortc put no candidate in the offer"
    # One overtakes the offer on the signaling path, the rest follow it.
    await client.handle_candidate(candidates[0])
    await client.handle_offer(bare_offer)
    for candidate in candidates[1:]:
        await client.handle_candidate(candidate)
    await client.handle_candidate(None)
    answer = cli_out.messages[0]
    assert isinstance(answer, Answer)
    await device.handle_answer(answer.sdp)
    await asyncio.gather(device.wait_open(TIMEOUT), client.wait_open(TIMEOUT))


async def test_malformed_candidates_are_ignored_not_fatal(
    peers: tuple[PeerSession, Outbox, PeerSession, Outbox],
) -> None:
    device, _, client, cli_out = peers
    await client.handle_offer(await device.start_offer())
    for junk in ("candidate:garbage", "candidate:1 1 udp notanumber 1.2.3.4 5 typ host", ""):
        await client.handle_candidate(IceCandidate(candidate=junk, sdp_mid="0", sdp_mline_index=0))
    answer = cli_out.messages[0]
    assert isinstance(answer, Answer)
    await device.handle_answer(answer.sdp)
    await asyncio.gather(device.wait_open(TIMEOUT), client.wait_open(TIMEOUT))


async def test_bad_sdp_and_out_of_order_descriptions_fail_the_session(
    peers: tuple[PeerSession, Outbox, PeerSession, Outbox],
) -> None:
    device, _, client, _ = peers
    with pytest.raises(SessionFailed, match="answer received without an outstanding offer"):
        await device.handle_answer("v=0\r\n")
    with pytest.raises(SessionFailed, match="invalid offer"):
        await client.handle_offer("this is not SDP")


async def test_a_channel_of_another_protocol_is_refused() -> None:
    outbox_a, outbox_b = Outbox(), Outbox()
    device = PeerSession("s-peer-test-2", outbox_a.send, channel_protocol="other/9")
    client = PeerSession("s-peer-test-2", outbox_b.send)
    try:
        await client.handle_offer(await device.start_offer())
        answer = outbox_b.messages[0]
        assert isinstance(answer, Answer)
        await device.handle_answer(answer.sdp)
        with pytest.raises(SessionFailed, match="not 'tunnelctl/1'"):
            await client.wait_open(TIMEOUT)
    finally:
        await device.close()
        await client.close()
