"""A worker whose negotiation was given up goes back to the pool (issue 9, PROTOCOL.md §3).

A real SessionWorker in this process, with a ZeroMQ ROUTER playing the
supervisor: after ``release`` it closes the PeerConnection whose offer went
unanswered, answers ``released`` with a fresh offer on the way, and serves the
next ``assign`` with that fresh offer; a release of anything else is ignored; a
session that connected just before its release is ended without a word to the
client, and the worker exits.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from protocol.ice import IceConfig
from protocol.ipc import (
    Assign,
    Drain,
    Ended,
    Hello,
    IpcMessage,
    Relay,
    Release,
    Released,
    StateReport,
    decode_ipc,
    encode_ipc,
    new_worker_id,
)
from protocol.signaling import (
    Answer,
    Offer,
    SessionEnd,
    SignalingMessage,
    decode_signaling,
    encode_signaling,
    new_session_id,
)
from workers.peer import PeerSession
from workers.session_worker import SessionWorker

pytestmark = pytest.mark.usefixtures("loopback_ice")

TIMEOUT = 20.0
HOSTS = ("127.0.0.1",)


class Supervisor:
    """The ROUTER end of one worker's channel."""

    def __init__(self, tmp_path: Path) -> None:
        self.ctx = zmq.asyncio.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"ipc://{tmp_path}/workers.sock"
        self.router.bind(self.endpoint)
        self.identity = b""

    async def next_message(self) -> IpcMessage:
        self.identity, payload = await asyncio.wait_for(self.router.recv_multipart(), TIMEOUT)
        return decode_ipc(payload)

    async def receive(self, kind: type[IpcMessage]) -> IpcMessage:
        """The next message of ``kind`` (heartbeats, states and the like skipped)."""
        while not isinstance(message := await self.next_message(), kind):
            pass
        return message

    async def offer(self) -> Offer:
        while True:
            relay = await self.receive(Relay)
            assert isinstance(relay, Relay)
            offer = decode_signaling(relay.message)
            if isinstance(offer, Offer):
                return offer

    async def send(self, message: IpcMessage) -> None:
        await self.router.send_multipart([self.identity, encode_ipc(message)])

    def close(self) -> None:
        self.router.close()
        self.ctx.term()


@pytest.fixture
async def supervisor(tmp_path: Path) -> AsyncIterator[Supervisor]:
    sup = Supervisor(tmp_path)
    yield sup
    sup.close()


async def start(sup: Supervisor) -> tuple[SessionWorker, asyncio.Future[str]]:
    worker = SessionWorker(
        new_worker_id(), sup.endpoint, os.getpid(), heartbeat_timeout=60.0, ice=IceConfig((), HOSTS)
    )
    running = asyncio.ensure_future(worker.run())
    assert isinstance(await sup.receive(Hello), Hello)
    return worker, running


def assign(session: str) -> Assign:
    return Assign(session=session, device="dev1", client="c1", services=(), ice_hosts=HOSTS)


async def test_a_released_worker_serves_the_next_session_with_a_fresh_offer(
    supervisor: Supervisor,
) -> None:
    worker, running = await start(supervisor)
    try:
        first = new_session_id()
        await supervisor.send(assign(first))
        unanswered = await supervisor.offer()
        assert unanswered.session == first
        given_up = worker.peer
        assert given_up is not None

        await supervisor.send(Release(first, "negotiation not done in 5 s; given up"))
        assert await supervisor.receive(Released) == Released(first)
        assert given_up.pc.connectionState == "closed"  # its sockets freed before "released"
        assert worker.session_id is None and worker.peer is None
        assert not running.done()

        second = new_session_id()
        await supervisor.send(assign(second))
        offer = await supervisor.offer()
        assert offer.session == second
        assert offer.sdp != unanswered.sdp  # a fresh PeerConnection, not the given-up one
        assert worker.peer is not None and worker.peer is not given_up
        assert worker.offers_prepared == 2
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_a_release_of_another_session_is_ignored(supervisor: Supervisor) -> None:
    _, running = await start(supervisor)
    try:
        session = new_session_id()
        await supervisor.send(assign(session))
        await supervisor.offer()
        await supervisor.send(Release(new_session_id(), "not yours"))
        await supervisor.send(Release(session, "given up"))
        # Messages are handled in order: the first answer is to the second release.
        assert await supervisor.receive(Released) == Released(session)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_a_released_worker_told_to_drain_exits(supervisor: Supervisor) -> None:
    """The supervisor began to stop while the release was on its way."""
    _, running = await start(supervisor)
    session = new_session_id()
    await supervisor.send(assign(session))
    await supervisor.offer()
    await supervisor.send(Release(session, "given up"))
    await supervisor.receive(Released)
    await supervisor.send(Drain(5.0))
    assert await asyncio.wait_for(running, TIMEOUT) == "supervisor stopping"


async def test_a_session_connected_before_its_release_ends_without_telling_the_client(
    supervisor: Supervisor,
) -> None:
    """The race: the channel opened as the supervisor gave up (and told the client)."""
    _, running = await start(supervisor)
    session = new_session_id()
    to_device: list[SignalingMessage] = []

    async def outbox(message: SignalingMessage) -> None:
        to_device.append(message)

    client = PeerSession(session, outbox)
    try:
        await supervisor.send(assign(session))
        offer = await supervisor.offer()
        await client.handle_offer(offer.sdp)
        answer = to_device[0]
        assert isinstance(answer, Answer)
        relayed = encode_signaling(Answer(session, answer.sdp, "c1"))
        await supervisor.send(Relay(session, relayed))
        while True:  # skip the states before it (checking, connecting, ...)
            report = await supervisor.receive(StateReport)
            assert isinstance(report, StateReport)
            if report.state == "connected":
                break
        await supervisor.send(Release(session, "given up"))
        while True:
            message = await supervisor.next_message()
            if isinstance(message, Relay):
                told = decode_signaling(message.message)
                assert not isinstance(told, SessionEnd), "the client was told twice"
            elif isinstance(message, Released):
                raise AssertionError("a connected session was released")
            elif isinstance(message, Ended):
                assert message == Ended(session, "given up", True)
                break
        assert await asyncio.wait_for(running, TIMEOUT) == "given up"
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await client.close()
