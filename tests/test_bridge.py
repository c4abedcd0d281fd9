"""TunnelBridge over a real aiortc DataChannel (both peers in this process, on
127.0.0.1) with real TCP sockets on loopback at both ends."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from protocol.frames import INITIAL_WINDOW, ResetCode
from protocol.mux import Role
from protocol.signaling import Answer, Candidate, Offer, SignalingMessage
from workers.bridge import READ_SIZE, STREAM_SEND_HIGH, ServiceAddress, TunnelBridge
from workers.peer import PeerSession

TIMEOUT = 20.0
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


pytestmark = pytest.mark.usefixtures("loopback_ice")


@dataclass
class Pair:
    device: TunnelBridge
    client: TunnelBridge
    peers: tuple[PeerSession, PeerSession]
    refused: list[tuple[str, int, str]] = field(default_factory=list)
    servers: list[asyncio.Server] = field(default_factory=list)

    async def local_stream(self, service: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connected local TCP socket whose other end the client bridge carries to ``service``."""
        accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def attach(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.client.attach(service, reader, writer)
            accepted.set_result(None)

        server = await asyncio.start_server(attach, "127.0.0.1", 0)
        self.servers.append(server)
        port = server.sockets[0].getsockname()[1]
        conn = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.wait_for(accepted, TIMEOUT)
        return conn


async def start_service(handler: Handler) -> tuple[asyncio.Server, ServiceAddress]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, ServiceAddress("127.0.0.1", server.sockets[0].getsockname()[1])


@pytest.fixture
async def make_pair() -> AsyncIterator[Callable[[dict[str, ServiceAddress]], Awaitable[Pair]]]:
    made: list[Pair] = []

    async def make(services: dict[str, ServiceAddress]) -> Pair:
        queues: dict[str, asyncio.Queue[SignalingMessage]] = {
            "dev": asyncio.Queue(),
            "cli": asyncio.Queue(),
        }

        async def to_client(message: SignalingMessage) -> None:
            queues["cli"].put_nowait(message)

        async def to_device(message: SignalingMessage) -> None:
            queues["dev"].put_nowait(message)

        device = PeerSession("s-bridge-test", to_client)
        client = PeerSession("s-bridge-test", to_device)

        async def pump(queue: asyncio.Queue[SignalingMessage], peer: PeerSession) -> None:
            while True:
                message = await queue.get()
                if isinstance(message, Offer):
                    await peer.handle_offer(message.sdp)
                elif isinstance(message, Answer):
                    await peer.handle_answer(message.sdp)
                elif isinstance(message, Candidate):
                    await peer.handle_candidate(message.candidate)

        pumps = [
            asyncio.ensure_future(pump(queues["cli"], client)),
            asyncio.ensure_future(pump(queues["dev"], device)),
        ]
        await device.start_offer()
        dev_channel, cli_channel = await asyncio.gather(
            device.wait_open(TIMEOUT), client.wait_open(TIMEOUT)
        )
        for task in pumps:
            task.cancel()
        refused: list[tuple[str, int, str]] = []
        pair = Pair(
            TunnelBridge(dev_channel, Role.DEVICE, services=services),
            TunnelBridge(cli_channel, Role.CLIENT, on_refused=lambda *a: refused.append(a)),
            (device, client),
            refused,
        )
        made.append(pair)
        return pair

    yield make
    for pair in made:
        pair.device.close()
        pair.client.close()
        for server in pair.servers:
            server.close()
        for peer in pair.peers:
            await peer.close()


async def test_bytes_cross_both_ways_with_half_close(
    make_pair: Callable[..., Awaitable[Pair]],
) -> None:
    async def reverse_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's half-close arrives
        writer.write(data[::-1])
        await writer.drain()
        writer.close()

    server, address = await start_service(reverse_after_eof)
    pair = await make_pair({"rev": address})
    payload = os.urandom(3 * 1024 * 1024 + 7)
    reader, writer = await pair.local_stream("rev")
    writer.write(payload)
    writer.write_eof()  # shutdown(SHUT_WR): carried across as FIN
    got = await asyncio.wait_for(reader.read(), TIMEOUT)
    assert got == payload[::-1]
    writer.close()
    server.close()


async def test_unknown_service_is_reset_and_reported(
    make_pair: Callable[..., Awaitable[Pair]],
) -> None:
    server, address = await start_service(lambda r, w: asyncio.sleep(0))
    pair = await make_pair({"web": address})
    reader, writer = await pair.local_stream("admin")
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    assert pair.refused == [("admin", ResetCode.UNKNOWN_SERVICE, "service 'admin' is not exposed")]
    assert pair.device.stats.streams_refused == 1
    writer.close()
    server.close()


async def test_a_service_that_refuses_connections_gives_a_prompt_reset(
    make_pair: Callable[..., Awaitable[Pair]],
) -> None:
    server, address = await start_service(lambda r, w: asyncio.sleep(0))
    server.close()
    await server.wait_closed()  # nothing listens on that port any more
    pair = await make_pair({"gone": address})
    reader, writer = await pair.local_stream("gone")
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    assert pair.refused and pair.refused[0][1] == ResetCode.CONNECT_FAILED
    assert "cannot connect to service 'gone'" in pair.refused[0][2]
    writer.close()


async def test_a_stalled_reader_holds_bounded_buffers_and_does_not_stall_others(
    make_pair: Callable[..., Awaitable[Pair]],
) -> None:
    firehose_total = 256 * 1024 * 1024
    blob = os.urandom(4 * 1024 * 1024)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        what = await reader.readexactly(4)
        if what == b"fire":
            chunk = b"\x00" * 65536
            for _ in range(firehose_total // len(chunk)):
                writer.write(chunk)
                await writer.drain()  # blocks once the tunnel stops taking data
        else:
            writer.write(blob)
            await writer.drain()
        writer.close()

    server, address = await start_service(serve)
    pair = await make_pair({"svc": address})
    _never_read, slow_writer = await pair.local_stream("svc")
    slow_writer.write(b"fire")  # and never read from slow_reader
    fast_reader, fast_writer = await pair.local_stream("svc")
    fast_writer.write(b"blob")
    got = await asyncio.wait_for(fast_reader.readexactly(len(blob)), TIMEOUT)
    assert hashlib.sha256(got).digest() == hashlib.sha256(blob).digest()

    # The stalled stream's user-space buffers are bounded by the protocol, not by the
    # 256 MiB the service wants to send: at most one window unacknowledged on the
    # receiving side and STREAM_SEND_HIGH (+ one read) queued on the sending side.
    slow_id = 1  # the client's first stream
    assert slow_id in pair.device._streams and slow_id in pair.client._streams
    assert pair.client._streams[slow_id].unacked <= INITIAL_WINDOW
    assert pair.device.mux.pending_bytes(slow_id) <= STREAM_SEND_HIGH + READ_SIZE
    assert pair.device.stats.bytes_out < firehose_total // 4
    slow_writer.close()
    fast_writer.close()
    server.close()


async def test_closing_the_tunnel_drops_every_local_connection(
    make_pair: Callable[..., Awaitable[Pair]],
) -> None:
    hold = asyncio.Event()

    async def idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await hold.wait()

    server, address = await start_service(idle)
    pair = await make_pair({"idle": address})
    conns = [await pair.local_stream("idle") for _ in range(3)]
    pair.device.close("test over")
    for reader, _ in conns:
        with contextlib.suppress(ConnectionResetError):  # EOF or reset: either says "gone"
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    assert await asyncio.wait_for(pair.client.wait_closed(), TIMEOUT) == "DataChannel closed"
    hold.set()
    server.close()


async def test_a_protocol_violation_ends_the_session(
    make_pair: Callable[..., Awaitable[Pair]],
) -> None:
    server, address = await start_service(lambda r, w: asyncio.sleep(0))
    pair = await make_pair({"web": address})
    pair.client.channel.send(b"\x09\x00\x00\x00\x00\x00\x00\x01")  # unknown frame type
    reason = await asyncio.wait_for(pair.device.wait_closed(), TIMEOUT)
    assert reason.startswith("protocol error:")
    server.close()


async def test_text_messages_end_the_session(make_pair: Callable[..., Awaitable[Pair]]) -> None:
    server, address = await start_service(lambda r, w: asyncio.sleep(0))
    pair = await make_pair({"web": address})
    pair.client.channel.send("not binary")
    reason = await asyncio.wait_for(pair.device.wait_closed(), TIMEOUT)
    assert "text message" in reason
    server.close()
