"""End to end: authorised but hostile clients against real processes (issue 9).

Each test reproduces one attack of issue 9 against a real signaling server and
a real device (a supervisor with forked workers) and checks that it now fails,
while the victim's session goes on working.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest

from protocol.signaling import (
    Candidate,
    Offer,
    SessionEnd,
    SessionRequest,
    SignalingMessage,
    new_session_id,
)
from signaling.link import SignalingLink
from tests.e2e.conftest import PAGE, READY
from tests.e2e.hostile_support import REPLY, HostileDevice, hostile_client, running_device

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("loopback_ice")]


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileDevice]:
    with running_device(tmp_path_factory.mktemp("clients")) as hostile_device:
        yield hostile_device


class RawClient:
    """A client's signaling link and nothing else: it sends what the test says."""

    def __init__(self, device: HostileDevice, client: str) -> None:
        self.inbox: asyncio.Queue[SignalingMessage] = asyncio.Queue()
        self.link = SignalingLink(
            device.tunnel.signal_url, device.token(client), self.inbox.put_nowait, fail_fast=True
        )

    async def next(self, kind: type[SignalingMessage], session: str) -> SignalingMessage:
        """The next message of type ``kind`` about ``session`` (others are skipped)."""
        async with asyncio.timeout(REPLY):
            while True:
                message = await self.inbox.get()
                if isinstance(message, kind) and getattr(message, "session", None) == session:
                    return message


@contextlib.asynccontextmanager
async def raw_client(device: HostileDevice, client: str) -> AsyncIterator[RawClient]:
    raw = RawClient(device, client)
    raw.link.start()
    try:
        await raw.link.wait_up(READY)
        yield raw
    finally:
        await raw.link.close()


async def test_a_session_is_not_hijacked_after_its_client_s_link_drops(
    device: HostileDevice,
) -> None:
    """B's signaling link drops; X asks for B's session id and ends it: B goes on."""
    async with hostile_client(device, "bob") as bob:
        assert await bob.http_get("/") == PAGE
        await bob.link.close()  # the DataChannel does not depend on signaling
        async with raw_client(device, "mallory") as mallory:
            sid = bob.session_id
            await mallory.link.send(SessionRequest(session=sid, device=device.device_id))
            # Sent before the device's refusal can arrive: the device itself
            # must tell that these are not from the session's owner.
            await mallory.link.send(Candidate(session=sid, candidate=None))
            await mallory.link.send(SessionEnd(session=sid, reason="hijacked by mallory"))
            # A fresh session of mallory's: once it is offered, the device has
            # handled everything mallory sent before it (one link, in order).
            fresh = new_session_id()
            await mallory.link.send(SessionRequest(session=fresh, device=device.device_id))
            await mallory.next(Offer, fresh)
            await mallory.link.send(SessionEnd(session=fresh, reason="done"))
        assert await bob.http_get("/") == PAGE
        row = await device.session_row(sid, lambda r: True)
        assert (row["state"], row["client"], row["reason"]) == ("running", "bob", None)
        assert not bob.ended
    assert device.log_lines("hijacked") == []
