"""TunnelBridge over a real aiortc DataChannel (both peers in this process, on
127.0.0.1) with real TCP sockets on loopback at both ends."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from protocol.frames import INITIAL_WINDOW, Data, ResetCode, encode_frame
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
    stream_ids: list[int] = field(default_factory=list)  # as attach() returned them

    async def local_stream(self, service: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connected local TCP socket whose other end the client bridge carries to ``service``."""
        accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def attach(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.stream_ids.append(self.client.attach(service, reader, writer))
            accepted.set_result(None)

        server = await asyncio.start_server(attach, "127.0.0.1", 0)
        self.servers.append(server)
        port = server.sockets[0].getsockname()[1]
        conn = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.wait_for(accepted, TIMEOUT)
        return conn


def abort_with_reset(writer: asyncio.StreamWriter) -> None:
    """Close abortively, as a crashing peer would: SO_LINGER 0, so an RST, not a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def start_service(handler: Handler) -> tuple[asyncio.Server, ServiceAddress]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, ServiceAddress("127.0.0.1", server.sockets[0].getsockname()[1])


def linked_peers() -> tuple[PeerSession, PeerSession, list[asyncio.Task[None]]]:
    """A device and a client PeerSession whose signaling is relayed in memory
    (cancel the returned pump tasks once the channel is open)."""
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
        asyncio.create_task(pump(queues["cli"], client)),
        asyncio.create_task(pump(queues["dev"], device)),
    ]
    return device, client, pumps


@pytest.fixture
async def make_pair() -> AsyncIterator[Callable[[dict[str, ServiceAddress]], Awaitable[Pair]]]:
    made: list[Pair] = []

    async def make(services: dict[str, ServiceAddress]) -> Pair:
        device, client, pumps = linked_peers()
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
    with pytest.raises(ConnectionResetError):  # a RESET ends the local connection with an RST
        await asyncio.wait_for(reader.read(), TIMEOUT)
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
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), TIMEOUT)
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
    got = await asyncio.wait_for(
        fast_reader.readexactly(len(blob)), TIMEOUT * 3
    )  # a fast transfer on a loaded 2-core machine
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


async def test_a_service_reset_mid_stream_reaches_the_client_as_a_reset(
    make_pair: Callable[..., Awaitable[Pair]],
) -> None:
    head = os.urandom(100_000)

    async def reset_midway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(head)
        await reader.readexactly(2)  # the client has the head: now crash mid-response
        abort_with_reset(writer)

    server, address = await start_service(reset_midway)
    pair = await make_pair({"svc": address})
    reader, writer = await pair.local_stream("svc")
    assert await asyncio.wait_for(reader.readexactly(len(head)), TIMEOUT) == head
    writer.write(b"ok")
    # A clean EOF here would make the truncated response look complete.
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), TIMEOUT)
    assert pair.device.stream_count == 0
    writer.close()
    server.close()


async def test_a_vanished_local_client_resets_the_service_connection(
    make_pair: Callable[..., Awaitable[Pair]],
) -> None:
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    connected = asyncio.Event()

    async def wait_for_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        try:
            outcome.set_result("EOF" if await reader.read() == b"" else "data")
        except ConnectionResetError:
            outcome.set_result("reset")
        writer.close()

    server, address = await start_service(wait_for_request)
    pair = await make_pair({"svc": address})
    _, writer = await pair.local_stream("svc")
    await asyncio.wait_for(connected.wait(), TIMEOUT)
    abort_with_reset(writer)
    assert await asyncio.wait_for(outcome, TIMEOUT) == "reset"
    assert pair.device.stream_count == 0 and pair.client.stream_count == 0
    server.close()


async def test_stream_ids_strictly_increase_and_closed_ids_stay_closed(
    make_pair: Callable[..., Awaitable[Pair]],
) -> None:
    seen: list[bytes] = []

    async def echo_to_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        seen.append(data)
        writer.write(data)
        await writer.drain()
        writer.close()

    async def roundtrip(message: bytes) -> bytes:
        reader, writer = await pair.local_stream("echo")
        writer.write(message)
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), TIMEOUT)
        writer.close()
        return got

    server, address = await start_service(echo_to_eof)
    pair = await make_pair({"echo": address})
    for i in range(30):
        assert await roundtrip(b"seq %d" % i) == b"seq %d" % i
    concurrent = [b"par %d" % i for i in range(20)]
    assert await asyncio.gather(*map(roundtrip, concurrent)) == concurrent
    # Client ids are odd and strictly increasing (PROTOCOL.md §2.3): none reused.
    assert pair.stream_ids == list(range(1, 2 * 50, 2))
    assert pair.device.stats.streams_opened == 50
    assert pair.device.stream_count == 0 and pair.device.mux.stream_count == 0

    # A frame that arrives late for a closed id is dropped: it cannot reach a
    # newer stream, because no newer stream ever carries that id.
    pair.client.channel.send(encode_frame(Data(1, b"late for stream 1")))
    assert await roundtrip(b"after") == b"after"
    assert pair.stream_ids[-1] == 101
    assert b"late for stream 1" not in b"".join(seen)
    assert not pair.device.is_closed and not pair.client.is_closed
    server.close()


async def test_a_stream_opened_the_moment_the_channel_opens_is_not_lost() -> None:
    """The client may send its first OPEN as soon as its side of the channel is
    open, which is before the device's side is (DCEP: the device opens on the
    client's ACK), and aiortc hands a message to whoever listens at that instant,
    or to nobody. So the device's bridge must listen before the channel can open,
    as the worker's prepared session does (workers/session_worker.py ``_prepare``):
    bridge on the new channel, offer, ``expose`` at assignment, then
    ``wait_open``. Here the device's task resumes after ``wait_open`` only once the
    OPEN has been emitted, as on a loaded machine; a bridge attached at that point
    (the worker's order before cfd2592) loses the stream (RESET UNKNOWN_STREAM)."""

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"reply to " + await reader.read())
        await writer.drain()
        writer.close()

    server, address = await start_service(reply)
    device, client, pumps = linked_peers()
    dev_channel = device.create_channel()
    emitted = asyncio.Event()
    emit = dev_channel.emit

    def spy(event: str, *args: object) -> bool:  # sees emits without being a listener
        if event == "message":
            emitted.set()
        return bool(emit(event, *args))

    dev_channel.emit = spy  # type: ignore[method-assign]
    bridges = [TunnelBridge(dev_channel, Role.DEVICE, services={})]
    local: asyncio.Server | None = None
    try:
        await device.prepare_offer()
        bridges[0].expose({"svc": address})
        await device.send_offer()
        cli_channel = await client.wait_open(TIMEOUT)
        client_bridge = TunnelBridge(cli_channel, Role.CLIENT)
        bridges.append(client_bridge)

        def attach(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            client_bridge.attach("svc", reader, writer)

        local = await asyncio.start_server(attach, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", local.sockets[0].getsockname()[1]
        )
        writer.write(b"hello")
        writer.write_eof()

        await device.wait_open(TIMEOUT)
        await asyncio.wait_for(emitted.wait(), TIMEOUT)  # the OPEN came before we resumed
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b"reply to hello"
        assert bridges[0].stats.streams_opened == 1
        writer.close()
    finally:
        for task in pumps:
            task.cancel()
        for bridge in bridges:
            bridge.close()
        if local is not None:
            local.close()
        server.close()
        await device.close()
        await client.close()
