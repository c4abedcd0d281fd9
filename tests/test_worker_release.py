"""A worker whose negotiation was given up goes back to the pool (issue 9, PROTOCOL.md §3).

A real SessionWorker in this process, with a ZeroMQ ROUTER playing the
supervisor: after ``release`` it closes the PeerConnection whose offer went
unanswered, answers ``released`` with a fresh offer on the way, and serves the
next ``assign`` with that fresh offer; a release of anything else is ignored.
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
    Hello,
    IpcMessage,
    Relay,
    Release,
    Released,
    decode_ipc,
    encode_ipc,
    new_worker_id,
)
from protocol.signaling import Offer, decode_signaling, new_session_id
from workers.session_worker import SessionWorker

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

    async def receive(self, kind: type[IpcMessage]) -> IpcMessage:
        """The next message of ``kind`` (heartbeats, states and the like skipped)."""
        while True:
            self.identity, payload = await asyncio.wait_for(self.router.recv_multipart(), TIMEOUT)
            message = decode_ipc(payload)
            if isinstance(message, kind):
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
