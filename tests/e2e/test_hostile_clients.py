"""End to end: authorised but hostile clients against real processes (issue 9).

Each test reproduces one attack of issue 9 against a real signaling server and
a real device (a supervisor with forked workers) and checks that it now fails,
while the victim's session goes on working.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from protocol.signaling import (
    Candidate,
    Error,
    Offer,
    SessionEnd,
    SessionRequest,
    SignalingMessage,
    new_session_id,
)
from signaling.auth import LEEWAY, issue_token
from signaling.errors import LinkRejected
from signaling.link import SignalingLink
from tests.e2e.conftest import PAGE, READY
from tests.e2e.hostile_support import (
    REPLY,
    HostileClient,
    HostileDevice,
    hostile_client,
    running_device,
)
from tests.e2e.test_supervisor import ctl_json
from tests.e2e.test_tunnel import http_get

#: The device's ``negotiation_timeout`` (its default).
NEGOTIATION_TIMEOUT = 10.0

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

    async def next(
        self, kind: type[SignalingMessage], session: str, timeout: float = REPLY
    ) -> SignalingMessage:
        """The next message of type ``kind`` about ``session`` (others are skipped)."""
        async with asyncio.timeout(timeout):
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


async def hog_slots(
    device: HostileDevice, links: list[RawClient], stats: dict[str, int], asked: asyncio.Event
) -> None:
    """Issue 9's slot hog: 16 requests never answered, each re-asked when refused or ended.

    ``asked`` is set once the first 16 requests are sent."""
    mine: set[str] = set()

    async def ask(link: RawClient) -> None:
        sid = new_session_id()
        mine.add(sid)
        stats["requests"] += 1
        await link.link.send(SessionRequest(session=sid, device=device.device_id))
        if stats["requests"] >= 16:
            asked.set()

    async def keep_asking(link: RawClient) -> None:
        for _ in range(8):
            await ask(link)
        while True:
            message = await link.inbox.get()
            session = getattr(message, "session", None)
            if session not in mine:
                continue
            if isinstance(message, SessionEnd):
                stats["ended"] += 1
                await ask(link)
            elif isinstance(message, Error):
                stats[f"error {message.code}"] = stats.get(f"error {message.code}", 0) + 1
                # Paced, as a script retrying would be; not a synchronisation.
                await asyncio.sleep(0.5)
                await ask(link)

    await asyncio.gather(*(keep_asking(link) for link in links))


@pytest.mark.slow
async def test_a_slot_hog_does_not_keep_a_legitimate_client_out(device: HostileDevice) -> None:
    stats = {"requests": 0, "ended": 0}
    async with raw_client(device, "hog") as first, raw_client(device, "hog") as second:
        asked = asyncio.Event()
        hog = asyncio.create_task(hog_slots(device, [first, second], stats, asked))
        try:
            await asyncio.wait_for(asked.wait(), REPLY)
            started = time.monotonic()
            client = device.tunnel.start_client(device.device_id, token=device.token("alice"))
            line = await asyncio.to_thread(client.wait_line, "forwarding ", READY)
            took = time.monotonic() - started
            address = line.split()[1]
            assert await asyncio.to_thread(http_get, address, "/") == PAGE
            status = await asyncio.to_thread(ctl_json, device.runtime, "status")
        finally:
            hog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await hog  # raises what the hog met, if anything
    client.stop()  # else running_device stops it (by pid), with the other children
    assert isinstance(status, dict)
    workers = len(status["workers"])
    print(
        f"\nlegitimate connect next to a slot hog: forwarding after {took:.2f} s; "
        f"hog: {stats}; device workers: {workers}"
    )


async def test_a_given_up_worker_serves_a_later_session_without_a_fork(
    device: HostileDevice,
) -> None:
    """An offer nobody answers is given up; its worker process comes back to the
    pool with a fresh offer and serves the next session: nothing is forked for it."""
    # Every pool worker idle: the session takes the oldest, which stays the
    # oldest idle one once it is back.
    await device.status(lambda s: s["pool"]["idle"] >= s["pool"]["target"])
    async with raw_client(device, "idler") as idler:
        first = new_session_id()
        await idler.link.send(SessionRequest(session=first, device=device.device_id))
        await idler.next(Offer, first)
        row = await device.session_row(first, lambda r: r["worker_pid"] is not None)
        pid = row["worker_pid"]
        end = await idler.next(SessionEnd, first, NEGOTIATION_TIMEOUT + REPLY)
        assert isinstance(end, SessionEnd)
        assert end.reason == f"negotiation not done in {NEGOTIATION_TIMEOUT:g} s; given up"
        row = await device.session_row(first, lambda r: True)
        assert (row["state"], row["reason"]) == ("exited", end.reason)
        back = await device.status(
            lambda s: any(
                (w["pid"], w["state"], w["session"]) == (pid, "idle", None) for w in s["workers"]
            )
        )
        second = new_session_id()
        await idler.link.send(SessionRequest(session=second, device=device.device_id))
        await idler.next(Offer, second)
        row = await device.session_row(second, lambda r: r["worker_pid"] is not None)
        assert row["worker_pid"] == pid  # the given-up worker, first idle in the pool
        after = await device.status(lambda s: True)
        pids = {w["pid"] for w in after["workers"]}
        assert pids <= {w["pid"] for w in back["workers"]}  # nothing forked for it
        await idler.link.send(SessionEnd(session=second, reason="done"))
        await device.session_row(second, lambda r: r["state"] == "exited")


# -- expiry and revocation ---------------------------------------------------------------


@pytest.fixture(scope="module")
def revocable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HostileDevice, Path]]:
    """A device whose signaling server reads a revocation list."""
    workdir = tmp_path_factory.mktemp("revocable")
    revoked = workdir / "revoked"
    revoked.write_text("# operators add 'sub ID' or 'jti ID' lines\n")
    with running_device(workdir, signal_args=["--revoked", str(revoked)]) as hostile_device:
        yield hostile_device, revoked


async def assert_cannot_connect(device: HostileDevice, client: str, token: str, why: str) -> None:
    hostile = HostileClient(device, client, token)
    try:
        with pytest.raises(LinkRejected, match=why):
            await hostile.open(READY)
    finally:
        await hostile.close()


async def test_a_revoked_client_loses_its_sessions_and_cannot_open_new_ones(
    revocable: tuple[HostileDevice, Path],
) -> None:
    device, revoked = revocable
    async with hostile_client(device, "bob") as bob:
        assert await bob.http_get("/") == PAGE
        revoked.write_text("sub bob\n")
        os.kill(device.signal.pid, signal.SIGHUP)
        await bob.wait_channel_closed(REPLY)  # the device ended the DataChannel
        row = await device.session_row(bob.session_id, lambda r: r["state"] == "exited")
        assert row["reason"] == "client token revoked"
    await assert_cannot_connect(device, "bob", device.token("bob"), "revoked")


async def test_an_expired_client_loses_its_sessions_and_cannot_open_new_ones(
    revocable: tuple[HostileDevice, Path],
) -> None:
    device, _ = revocable
    # Expired 20 s ago: let in by the 30 s leeway, closed 10 s after it connects.
    token = issue_token(
        device.tunnel.secret,
        sub="eve",
        role="client",
        devices=[device.device_id],
        ttl=60,
        now=time.time() - 80,
    )
    async with hostile_client(device, "eve", token=token) as eve:
        assert await eve.http_get("/") == PAGE
        await eve.wait_channel_closed(LEEWAY + REPLY)
        row = await device.session_row(eve.session_id, lambda r: r["state"] == "exited")
        assert row["reason"] == "client token expired"
    await assert_cannot_connect(device, "eve", token, "expired")
