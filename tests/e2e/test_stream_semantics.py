"""End to end: what a TCP application sees through ``tunnelctl connect``.

Real ``tunnelctl signal`` / ``start`` / ``connect`` processes on loopback (the
``tunnel`` fixture); the services are servers these tests run on 127.0.0.1 in
their own event loop, exposed with ``--expose NAME=tcp://127.0.0.1:PORT``.

* WebSockets (``websockets`` on both ends): upgrade, text and binary both ways,
  an 8 MiB message, fragmented messages, ping/pong, close codes both ways.
* Many connections: 200 concurrent streams on one session; stream ids never
  reused; no fd leak over 10 000 sequential connections (``slow``).
* Half-close and resets (PROTOCOL.md §2.2 FIN / RESET ``CONNECT_FAILED``,
  ``CONNECTION_RESET``): a half-close is carried either way; a refused connect, a
  service reset and a vanished client all end promptly, as an application would
  see them over plain TCP, and free the device side's stream.

Timings are printed (``pytest -s``) and asserted only against generous deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from tests.e2e.conftest import Tunnel
from tests.e2e.stream_support import (
    PROMPT,
    Forward,
    abort_with_reset,
    open_fds,
    read_to_end,
    start_forward,
    unused_port,
    wait_for,
)

pytestmark = pytest.mark.e2e

#: Deadline for a whole exchange (a large message, 200 connections) to complete.
EXCHANGE = 60.0
BIG_MESSAGE = 8 * 1024 * 1024
SUBPROTOCOL = Subprotocol("tunnelctl-test")


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def start_service(handler: Handler) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0, backlog=1024)
    return server, int(server.sockets[0].getsockname()[1])


# -- WebSockets ---------------------------------------------------------------


@dataclass
class WsService:
    """A websockets server whose handlers record what the service side saw."""

    headers: dict[str, str] = field(default_factory=dict)
    fragments: asyncio.Future[list[bytes]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    server_ping: asyncio.Future[float] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    # path -> (code, reason) of the close frame the service received
    closes: dict[str, asyncio.Future[tuple[int, str]]] = field(default_factory=dict)

    def closed(self, path: str) -> asyncio.Future[tuple[int, str]]:
        return self.closes.setdefault(path, asyncio.get_running_loop().create_future())

    async def handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None  # the handler runs after the handshake
        path = ws.request.path
        self.headers.update({k.lower(): v for k, v in ws.request.headers.raw_items()})
        if path == "/echo":
            await ws.send("hello from the service")  # service → client, unprompted
            async for message in ws:
                await ws.send(message)
        elif path == "/fragments":
            got = [fragment async for fragment in ws.recv_streaming(decode=False)]
            self.fragments.set_result(got)

            async def back() -> AsyncIterator[bytes]:
                for fragment in reversed(got):
                    if fragment:
                        yield fragment

            await ws.send(back())
        elif path == "/ping":
            started = time.monotonic()
            await asyncio.wait_for(await ws.ping(b"from the service"), PROMPT)
            self.server_ping.set_result(time.monotonic() - started)
            await ws.send("service got its pong")
        elif path == "/bye":
            await ws.send("closing now")
            await ws.close(4000, "bye")
        await ws.wait_closed()
        rcvd = ws.protocol.close_rcvd
        self.closed(path).set_result((rcvd.code, rcvd.reason) if rcvd else (-1, ""))


@dataclass
class WsForward:
    service: WsService
    forward: Forward

    def connect(self, path: str) -> ws_connect:
        return ws_connect(
            f"ws://{self.forward.host}:{self.forward.port}{path}",
            subprotocols=[SUBPROTOCOL],
            additional_headers={"X-Tunnel-Test": "through the tunnel"},
            compression=None,  # the bytes on the wire are the message bytes
            max_size=2 * BIG_MESSAGE,
            close_timeout=PROMPT,
            proxy=None,  # straight to 127.0.0.1 whatever the environment says
        )


@pytest.fixture
async def ws_forward(tunnel: Tunnel) -> AsyncIterator[WsForward]:
    service = WsService()
    async with serve(
        service.handler,
        "127.0.0.1",
        0,
        subprotocols=[SUBPROTOCOL],
        compression=None,
        max_size=2 * BIG_MESSAGE,
        close_timeout=PROMPT,
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield WsForward(service, await start_forward(tunnel, "ws", port))


async def test_websocket_upgrade_and_text_and_binary_messages_both_ways(
    ws_forward: WsForward,
) -> None:
    async with ws_forward.connect("/echo") as ws:
        assert ws.response is not None and ws.response.status_code == 101
        assert ws.subprotocol == SUBPROTOCOL
        assert ws_forward.service.headers["x-tunnel-test"] == "through the tunnel"
        assert ws_forward.service.headers["upgrade"].lower() == "websocket"
        greeting = await asyncio.wait_for(ws.recv(), PROMPT)
        assert greeting == "hello from the service"
        for message in ("héllo wörld ✓", b"\x00\x01\xfe\xff binary", "", b""):
            await ws.send(message)
            echoed = await asyncio.wait_for(ws.recv(), PROMPT)
            assert echoed == message and type(echoed) is type(message)


async def test_websocket_8_mib_message_both_ways(ws_forward: WsForward) -> None:
    payload = random.Random(8).randbytes(BIG_MESSAGE)
    async with ws_forward.connect("/echo") as ws:
        await asyncio.wait_for(ws.recv(), PROMPT)  # greeting
        started = time.monotonic()
        await ws.send(payload)
        echoed = await asyncio.wait_for(ws.recv(), EXCHANGE)
        seconds = time.monotonic() - started
    assert isinstance(echoed, bytes) and len(echoed) == len(payload)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    print(f"\n8 MiB WebSocket message there and back in {seconds:.2f} s")


async def test_websocket_fragmented_messages_keep_their_fragments(
    ws_forward: WsForward,
) -> None:
    rng = random.Random(3)
    fragments = [rng.randbytes(size) for size in (1, 70_000, 3, 300_000, 65_536, 17)]

    async def send_fragments() -> AsyncIterator[bytes]:
        for fragment in fragments:
            yield fragment

    async with ws_forward.connect("/fragments") as ws:
        await ws.send(send_fragments())
        # TCP carries the frames unchanged, so the service sees the very same
        # fragments (websockets ends a message sent from an iterator with an empty
        # final frame: it cannot know which fragment is the last one).
        got = await asyncio.wait_for(ws_forward.service.fragments, EXCHANGE)
        assert got == [*fragments, b""]
        back = [f async for f in ws.recv_streaming(decode=False)]
        assert back == [*fragments[::-1], b""]


async def test_websocket_ping_pong_both_ways(ws_forward: WsForward) -> None:
    async with ws_forward.connect("/ping") as ws:
        started = time.monotonic()
        await asyncio.wait_for(await ws.ping(b"from the client"), PROMPT)
        client_rtt = time.monotonic() - started
        assert await asyncio.wait_for(ws.recv(), PROMPT) == "service got its pong"
        service_rtt = await ws_forward.service.server_ping
    print(
        f"\nping/pong through the tunnel: client {client_rtt * 1000:.1f} ms, "
        f"service {service_rtt * 1000:.1f} ms"
    )


async def test_websocket_close_codes_reach_the_other_side(ws_forward: WsForward) -> None:
    # The service closes with 4000 "bye": the client sees exactly that.
    async with ws_forward.connect("/bye") as ws:
        assert await asyncio.wait_for(ws.recv(), PROMPT) == "closing now"
        started = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), PROMPT)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4000, "bye")
        await asyncio.wait_for(ws.wait_closed(), PROMPT)  # the TCP close crossed too
        service_close = time.monotonic() - started
    assert await asyncio.wait_for(ws_forward.service.closed("/bye"), PROMPT) == (4000, "bye")

    # The client closes with 1000: the service sees 1000 and the reason.
    client: ClientConnection
    async with ws_forward.connect("/echo") as client:
        await asyncio.wait_for(client.recv(), PROMPT)
        started = time.monotonic()
        await client.close(1000, "done here")
        client_close = time.monotonic() - started
    assert await asyncio.wait_for(ws_forward.service.closed("/echo"), PROMPT) == (
        1000,
        "done here",
    )
    # A close handshake whose TCP close did not cross would wait out close_timeout.
    assert client_close < PROMPT and service_close < PROMPT
    print(
        f"\nclose handshakes: service-initiated {service_close * 1000:.0f} ms, "
        f"client-initiated {client_close * 1000:.0f} ms"
    )


# -- many connections -----------------------------------------------------------


def reply_to(request: bytes) -> bytes:
    """What the request/response service answers: it proves which request it saw."""
    return hashlib.sha256(request).hexdigest().encode() + b" " + request[::-1]


async def request_reply(forward: Forward, request: bytes) -> bytes:
    """One request (then a half-close) and the whole reply, over a new connection."""
    reader, writer = await forward.connect()
    try:
        writer.write(request)
        writer.write_eof()
        ending = await read_to_end(reader, EXCHANGE)
        assert not ending.reset, f"reset after {len(ending.data)} bytes"
        return ending.data
    finally:
        writer.close()


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Request/response service: read to EOF, reply, close."""
    try:
        request = await asyncio.wait_for(reader.read(), EXCHANGE)
        writer.write(reply_to(request))
        await writer.drain()
    finally:
        writer.close()


async def test_200_concurrent_connections_on_one_session(tunnel: Tunnel) -> None:
    count = 200
    arrived = 0
    all_arrived = asyncio.Event()
    release = asyncio.Event()

    async def held_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal arrived
        try:
            request = await asyncio.wait_for(reader.read(), EXCHANGE)
            arrived += 1
            if arrived == count:
                all_arrived.set()
            # Hold every connection until all of them are open at once.
            await asyncio.wait_for(release.wait(), EXCHANGE)
            writer.write(reply_to(request))
            await writer.drain()
        finally:
            writer.close()

    server, port = await start_service(held_answer)
    async with server:
        forward = await start_forward(tunnel, "echo", port)
        first = await forward.session()
        requests = [f"request {i} ".encode() + os.urandom(4096) for i in range(count)]
        started = time.monotonic()
        replies = asyncio.gather(*(request_reply(forward, r) for r in requests))
        try:
            await asyncio.wait_for(all_arrived.wait(), EXCHANGE)
            opened = time.monotonic() - started
            # The device's worker carries all of them at once, on one session.
            await forward.wait_streams(lambda n: n == count, f"{count} streams open at once")
        finally:
            release.set()
        got = await asyncio.wait_for(replies, EXCHANGE)
        seconds = time.monotonic() - started
        assert got == [reply_to(r) for r in requests]
        await forward.wait_streams(lambda n: n == 0, "every stream closed")

        # Stream ids are never reused: each side's OPEN ids strictly increase, and
        # the device's multiplexer ends the whole session on an OPEN whose id is not
        # above the previous one (PROTOCOL.md §2.3). So the one session, still
        # running, never restarted, with no session error logged on either side,
        # is the observable proof. (The in-process counterpart, with the ids and the
        # device's streams_opened counter, is in tests/test_bridge.py.)
        last = await forward.session()
        assert last["id"] == first["id"] and last["restarts"] == 0
        assert last["bytes_in"] >= sum(map(len, requests))
        for child in (forward.client, forward.device):
            assert not [line for line in child.stderr_lines if "protocol error" in line]
        assert not [line for line in forward.client.stderr_lines if "lost" in line]
    print(f"\n{count} concurrent connections: all open in {opened:.2f} s, done in {seconds:.2f} s")


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_10000_sequential_connections_leak_no_fds(tunnel: Tunnel) -> None:
    total = 10_000
    slack = 8  # fds that may come and go (a log file rotating, a lazily opened socket)
    server, port = await start_service(answer)
    async with server:
        forward = await start_forward(tunnel, "echo", port)
        for i in range(20):  # warm up: lazy imports and first-use allocations
            assert await request_reply(forward, b"warm %d" % i) == reply_to(b"warm %d" % i)
        await forward.wait_streams(lambda n: n == 0, "warm-up streams closed")
        worker = await forward.worker_pid()
        client = forward.client.pid
        before = {worker: open_fds(worker), client: open_fds(client)}

        started = time.monotonic()
        for i in range(total):
            request = b"GET /%d" % i
            assert await request_reply(forward, request) == reply_to(request), i
        seconds = time.monotonic() - started

        await forward.wait_streams(lambda n: n == 0, "every stream closed")

        async def settled() -> bool:
            return all(open_fds(pid) <= n + slack for pid, n in before.items())

        await wait_for(
            settled,
            PROMPT,
            lambda: f"fds before {before}, now { {p: open_fds(p) for p in before} }",
        )
        after = {pid: open_fds(pid) for pid in before}
        row = await forward.session()
        assert row["restarts"] == 0
    print(
        f"\n{total} sequential connections in {seconds:.1f} s "
        f"({seconds / total * 1000:.2f} ms each); "
        f"fds worker {before[worker]} -> {after[worker]}, "
        f"client {before[client]} -> {after[client]}"
    )


# -- half-close and resets --------------------------------------------------------


async def test_client_half_close_reaches_the_service_and_the_reply_still_comes(
    tunnel: Tunnel,
) -> None:
    saw_eof: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    received = 0
    reply = random.Random(5).randbytes(1024 * 1024 + 3)

    async def service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        while chunk := await reader.read(65536):  # until EOF
            received += len(chunk)
        saw_eof.set_result(received)
        writer.write(reply)  # the service still sends after reading EOF
        await writer.drain()
        writer.close()

    server, port = await start_service(service)
    async with server:
        forward = await start_forward(tunnel, "half", port)
        reader, writer = await forward.connect()
        request = os.urandom(600 * 1024)  # more than one window: FIN queues behind DATA
        writer.write(request)
        writer.write_eof()  # shutdown(SHUT_WR)
        try:
            assert await asyncio.wait_for(saw_eof, EXCHANGE) == len(request)
        except TimeoutError:
            raise AssertionError(
                f"no EOF at the service: {received} of {len(request)} bytes arrived; "
                f"client socket at EOF: {reader.at_eof()}, error: {reader.exception()!r}; "
                + await asyncio.to_thread(forward.diagnose)
            ) from None
        ending = await read_to_end(reader, EXCHANGE)
        writer.close()
    assert not ending.reset
    assert len(ending.data) == len(reply) and ending.data == reply


async def test_service_half_close_reaches_the_client_which_can_still_send(
    tunnel: Tunnel,
) -> None:
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"all I have to say\n")
        writer.write_eof()  # the service is done sending, still listening
        received.set_result(await asyncio.wait_for(reader.read(), EXCHANGE))
        writer.close()

    server, port = await start_service(service)
    async with server:
        forward = await start_forward(tunnel, "half", port)
        reader, writer = await forward.connect()
        assert await asyncio.wait_for(reader.read(), PROMPT) == b"all I have to say\n"  # EOF
        upload = os.urandom(700 * 1024)
        writer.write(upload)
        writer.write_eof()
        assert await asyncio.wait_for(received, EXCHANGE) == upload
        ending = await read_to_end(reader)  # the stream then ends cleanly
        writer.close()
    assert ending.data == b"" and not ending.reset


async def test_a_refused_service_connection_ends_the_client_connection_promptly(
    tunnel: Tunnel,
) -> None:
    with contextlib.closing(unused_port()) as nothing_listens:
        port = nothing_listens.getsockname()[1]
        forward = await start_forward(tunnel, "refused", port)
        endings = []
        for _ in range(3):  # the forward stays up: a refusal is per connection
            reader, writer = await forward.connect()
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            endings.append(await read_to_end(reader))
            writer.close()
        await forward.wait_streams(lambda n: n == 0, "refused streams forgotten")
    # Nothing was connected, so nothing arrives; and the client is told with an RST
    # (RESET CONNECT_FAILED), the nearest a forward can come to ECONNREFUSED.
    assert all(e.data == b"" and e.reset for e in endings), endings
    assert forward.client.proc.poll() is None
    print(
        "\nrefused connect ends the client connection in "
        + ", ".join(f"{e.seconds * 1000:.0f} ms ({'reset' if e.reset else 'EOF'})" for e in endings)
    )


async def test_a_service_reset_mid_response_reaches_the_client_as_a_reset(
    tunnel: Tunnel,
) -> None:
    response = random.Random(9).randbytes(4 * 1024 * 1024)
    reset_now = asyncio.Event()

    async def service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(response[: len(response) // 2])
        await asyncio.wait_for(reset_now.wait(), EXCHANGE)
        abort_with_reset(writer)  # SO_LINGER 0 then close: RST mid-response

    server, port = await start_service(service)
    async with server:
        forward = await start_forward(tunnel, "resets", port)
        reader, writer = await forward.connect()
        writer.write(b"GET /\n")
        first = await asyncio.wait_for(reader.readexactly(256 * 1024), EXCHANGE)
        reset_now.set()
        ending = await read_to_end(reader)
        writer.close()
        await forward.wait_streams(lambda n: n == 0, "the reset stream forgotten")
    got = first + ending.data
    assert response.startswith(got) and len(got) < len(response)
    print(
        f"\nservice reset mid-response: client saw {'a reset' if ending.reset else 'EOF'} "
        f"{ending.seconds * 1000:.0f} ms later, after {len(got)} of {len(response)} bytes"
    )
    # A clean EOF would make a truncated response look complete to the client.
    assert ending.reset, "the service's RST reached the client as a clean EOF"


@pytest.mark.parametrize("service_is", ["sending", "idle"])
async def test_a_vanished_client_frees_the_device_side_promptly(
    tunnel: Tunnel, service_is: str
) -> None:
    connected = asyncio.Event()
    ended: asyncio.Future[tuple[str, float]] = asyncio.get_running_loop().create_future()
    chunk = os.urandom(64 * 1024)

    async def service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        how = "EOF"
        try:
            if service_is == "sending":
                for _ in range(4096):  # 256 MiB: far more than the client will read
                    writer.write(chunk)
                    await writer.drain()
                how = "finished sending?!"
            else:
                if await reader.read(1) != b"":
                    how = "data?!"
        except ConnectionResetError:
            how = "reset"
        except BrokenPipeError:
            how = "broken pipe"
        ended.set_result((how, time.monotonic()))
        writer.close()

    server, port = await start_service(service)
    async with server:
        forward = await start_forward(tunnel, "vanish", port)
        worker = await forward.worker_pid()
        fds_before = open_fds(worker)
        reader, writer = await forward.connect()
        await asyncio.wait_for(connected.wait(), PROMPT)
        if service_is == "sending":
            await asyncio.wait_for(reader.readexactly(1024 * 1024), EXCHANGE)  # mid-transfer
        await forward.wait_streams(lambda n: n == 1, "the stream is open on the device")
        vanished = time.monotonic()
        abort_with_reset(writer)
        how, when = await asyncio.wait_for(ended, PROMPT)
        row = await forward.wait_streams(lambda n: n == 0, "the device forgot the stream")
        freed = time.monotonic() - vanished

        async def fds_back() -> bool:
            return open_fds(worker) <= fds_before

        await wait_for(fds_back, PROMPT, lambda: f"worker fds {fds_before} -> {open_fds(worker)}")
    # The client's RST is carried to the service as an RST (RESET CONNECTION_RESET).
    assert how in ("reset", "broken pipe"), how
    assert row["restarts"] == 0
    print(
        f"\nclient vanished ({service_is} service): service saw {how} after "
        f"{(when - vanished) * 1000:.0f} ms; streams back to 0 within {freed:.1f} s"
    )
