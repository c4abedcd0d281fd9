"""An idle worker keeps its prepared offer fresh (issue 7: prepared candidates go stale).

A real SessionWorker in this process, with a ZeroMQ ROUTER playing the
supervisor: its prepared offer is replaced after ``prepared_max_age``, the old
PeerConnection (and so any TURN allocation) is closed, and a session assigned
afterwards gets the fresh offer.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import zmq
import zmq.asyncio

from protocol.ice import IceConfig
from protocol.ipc import Assign, Hello, Relay, decode_ipc, encode_ipc, new_worker_id
from protocol.signaling import Offer, decode_signaling, new_session_id
from workers.session_worker import SessionWorker

TIMEOUT = 20.0


async def test_an_idle_worker_replaces_its_prepared_offer_and_uses_the_fresh_one(
    tmp_path: Path,
) -> None:
    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{tmp_path}/workers.sock"
    router.bind(endpoint)
    hosts = ("127.0.0.1",)
    worker = SessionWorker(
        new_worker_id(),
        endpoint,
        os.getpid(),
        heartbeat_timeout=60.0,
        ice=IceConfig((), hosts),
        prepared_max_age=0.2,
    )
    running = asyncio.ensure_future(worker.run())
    try:
        identity, payload = await asyncio.wait_for(router.recv_multipart(), TIMEOUT)
        assert isinstance(decode_ipc(payload), Hello)
        assert worker._prepared is not None
        first, _ = await asyncio.wait_for(worker._prepared, TIMEOUT)
        await asyncio.wait_for(worker.offer_refreshed.wait(), TIMEOUT)
        fresh, _ = await asyncio.wait_for(worker._prepared, TIMEOUT)
        assert fresh is not first
        assert first.pc.connectionState == "closed"  # its sockets and allocations freed
        assert worker.offers_prepared >= 2

        session = new_session_id()
        assignment = Assign(
            session=session, device="dev1", client="c1", services=(), ice_hosts=hosts
        )
        await router.send_multipart([identity, encode_ipc(assignment)])
        while True:
            _, payload = await asyncio.wait_for(router.recv_multipart(), TIMEOUT)
            message = decode_ipc(payload)
            if isinstance(message, Relay):
                offer = decode_signaling(message.message)
                break
        assert isinstance(offer, Offer) and offer.session == session
        current, _ = await asyncio.wait_for(worker._prepared, TIMEOUT)
        assert current.pc.localDescription is not None
        assert offer.sdp == current.pc.localDescription.sdp  # the fresh offer, not a stale one
        assert current.pc.connectionState != "closed"
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        router.close()
        ctx.term()
