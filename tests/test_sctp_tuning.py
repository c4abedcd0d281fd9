"""The SCTP tuning of workers.aiortc_tuning, with two real aiortc peers on 127.0.0.1.

Both peers run in this process, so both are tuned (the tuning patches aiortc's
classes); tuned against stock is ``tests/e2e/test_sctp_interop.py``. A lossy
link sits in each peer's send path, below DTLS: it drops, reorders and
duplicates datagrams at random (seeded), as a bad Wi-Fi path does, and every
message must still arrive intact and in order, both ways at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection

from workers import aiortc_tuning

TIMEOUT = 60.0

pytestmark = pytest.mark.usefixtures("loopback_ice")


class LossyLink:
    """A datagram transport that loses, reorders and duplicates what it is given."""

    def __init__(self, inner: Any, seed: int, loss: float, reorder: float, duplicate: float):
        self.inner = inner
        self.random = random.Random(seed)
        self.loss, self.reorder, self.duplicate = loss, reorder, duplicate
        self.held: tuple[bytes, Any] | None = None
        self.counts = {"sent": 0, "lost": 0, "reordered": 0, "duplicated": 0}

    def sendto(self, data: bytes, addr: Any) -> None:
        if not 19 < data[0] < 64:  # STUN (consent checks) passes untouched: only DTLS suffers
            self.inner.sendto(data, addr)
            return
        self.counts["sent"] += 1
        draw = self.random.random()
        if draw < self.loss:
            self.counts["lost"] += 1
            return
        if draw < self.loss + self.reorder and self.held is None:
            # Held back until the next datagram has gone (or a moment has passed).
            self.counts["reordered"] += 1
            self.held = (data, addr)
            asyncio.get_running_loop().call_later(0.005, self.release)
            return
        self.inner.sendto(data, addr)
        if draw > 1 - self.duplicate:
            self.counts["duplicated"] += 1
            self.inner.sendto(data, addr)
        self.release()

    def release(self) -> None:
        if self.held is not None:
            data, addr = self.held
            self.held = None
            self.inner.sendto(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def open_pair() -> tuple[
    RTCPeerConnection, RTCPeerConnection, RTCDataChannel, RTCDataChannel
]:
    offerer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    answerer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    channel = offerer.createDataChannel("lossy", ordered=True)
    remote: asyncio.Future[RTCDataChannel] = asyncio.get_running_loop().create_future()
    answerer.on("datachannel", remote.set_result)
    opened = asyncio.Event()
    channel.on("open", opened.set)
    await offerer.setLocalDescription(await offerer.createOffer())
    await answerer.setRemoteDescription(offerer.localDescription)
    await answerer.setLocalDescription(await answerer.createAnswer())
    await offerer.setRemoteDescription(answerer.localDescription)
    await asyncio.wait_for(opened.wait(), TIMEOUT)
    return offerer, answerer, channel, await asyncio.wait_for(remote, TIMEOUT)


@pytest.fixture
async def pair() -> AsyncIterator[
    tuple[RTCPeerConnection, RTCPeerConnection, RTCDataChannel, RTCDataChannel]
]:
    assert aiortc_tuning.install()
    offerer, answerer, a, b = await open_pair()
    yield offerer, answerer, a, b
    await offerer.close()
    await answerer.close()


def make_lossy(pc: RTCPeerConnection, seed: int, **rates: float) -> LossyLink:
    assert pc.sctp is not None
    connection = pc.sctp.transport.transport._connection
    pair = connection._nominated[1]
    link = LossyLink(pair.protocol.transport, seed, **rates)
    pair.protocol.transport = link
    return link


def messages(seed: int, total: int) -> list[bytes]:
    """Messages of 1 byte to 64 KiB (many fragments each), ``total`` bytes in all."""
    rng = random.Random(seed)
    out, size = [], 0
    while size < total:
        length = rng.choice([1, 63, 1159, 1160, 1161, 4000, 16384, 65536])
        out.append(rng.randbytes(length))
        size += length
    return out


async def transfer(
    sender: RTCDataChannel, receiver: RTCDataChannel, payload: list[bytes]
) -> list[bytes]:
    """Send ``payload`` over ``sender``; return what ``receiver`` got, in order."""
    got: list[bytes] = []
    done = asyncio.get_running_loop().create_future()

    def on_message(message: bytes) -> None:
        got.append(message)
        if len(got) == len(payload) and not done.done():
            done.set_result(None)

    receiver.on("message", on_message)
    low = asyncio.Event()
    sender.bufferedAmountLowThreshold = 64 * 1024
    sender.on("bufferedamountlow", low.set)
    for message in payload:
        sender.send(message)
        if sender.bufferedAmount > 256 * 1024:
            low.clear()
            await asyncio.wait_for(low.wait(), TIMEOUT)
    await asyncio.wait_for(done, TIMEOUT)
    return got


def digest(items: list[bytes]) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(len(item).to_bytes(4, "big") + item)
    return h.hexdigest()


@pytest.mark.parametrize("seed", [1, 2])
async def test_messages_arrive_intact_and_in_order_over_a_lossy_reordering_link(
    pair: tuple[RTCPeerConnection, RTCPeerConnection, RTCDataChannel, RTCDataChannel],
    seed: int,
) -> None:
    offerer, answerer, a, b = pair
    links = [
        make_lossy(offerer, seed, loss=0.05, reorder=0.05, duplicate=0.02),
        make_lossy(answerer, seed + 100, loss=0.05, reorder=0.05, duplicate=0.02),
    ]
    forth, back = messages(seed, 1_500_000), messages(seed + 1, 1_500_000)
    started = time.monotonic()
    got_forth, got_back = await asyncio.gather(transfer(a, b, forth), transfer(b, a, back))
    print(
        f"\n{sum(map(len, forth)) + sum(map(len, back))} bytes both ways in "
        f"{time.monotonic() - started:.2f} s; links: {[link.counts for link in links]}"
    )
    assert [len(m) for m in got_forth] == [len(m) for m in forth]
    assert digest(got_forth) == digest(forth)
    assert digest(got_back) == digest(back)
    for link in links:
        assert link.counts["lost"] and link.counts["reordered"] and link.counts["duplicated"]


async def test_small_messages_share_packets_and_sacks_are_delayed(
    pair: tuple[RTCPeerConnection, RTCPeerConnection, RTCDataChannel, RTCDataChannel],
) -> None:
    """Ten 64-byte messages sent in one loop turn leave in one packet; bulk data is
    SACKed about every second packet, not every packet (RFC 4960 §6.2)."""
    offerer, answerer, a, b = pair
    sent = [make_lossy(offerer, 0, loss=0, reorder=0, duplicate=0)]
    back = make_lossy(answerer, 0, loss=0, reorder=0, duplicate=0)
    burst = [bytes([i]) * 64 for i in range(10)]
    got = await transfer(a, b, burst)
    assert got == burst
    assert sent[0].counts["sent"] == 1, sent[0].counts
    before = (sent[0].counts["sent"], back.counts["sent"])
    bulk = [bytes(16384)] * 16
    assert await transfer(a, b, bulk) == bulk
    data_packets = sent[0].counts["sent"] - before[0]
    sacks = back.counts["sent"] - before[1]
    print(f"\n{data_packets} packets of DATA, {sacks} of SACK")
    assert data_packets >= 16 * 16384 // 1200
    assert sacks <= data_packets // 2 + 2


@pytest.mark.parametrize(("aiortc_version", "tuned"), [("9.9.9", False), (None, True)])
def test_sctp_is_tuned_only_for_the_verified_aiortc(
    aiortc_version: str | None, tuned: bool
) -> None:
    """Outside the verified versions nothing in aiortc's SCTP or aioice's UDP is replaced."""
    code = (
        "import importlib.metadata as m, sys\n"
        "real = m.version\n"
        "fake = sys.argv[1]\n"
        "m.version = lambda name: fake if name == 'aiortc' and fake else real(name)\n"
        "from aiortc.rtcsctptransport import RTCSctpTransport as T\n"
        "from aioice.ice import StunProtocol as P\n"
        "before = {(c, n): v for c in (T, P) for n, v in vars(c).items()}\n"
        "from workers import aiortc_tuning\n"
        "print(aiortc_tuning.install())\n"
        "print(sorted(n for (c, n), v in before.items() if vars(c)[n] is not v))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, aiortc_version or ""],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    installed, changed = done.stdout.splitlines()
    assert installed == str(tuned), done.stderr
    if tuned:
        assert "_handle_data" in changed and "datagram_received" in changed, changed
    else:
        assert changed == "[]", done.stderr
