"""HTTP streams (PROTOCOL.md §2.8) through two TunnelBridges over a real aiortc
DataChannel in this process, against a real HTTP server (aiohttp.web) and real
sockets on 127.0.0.1: what the device sends the service, what comes back, and
that nothing is buffered beyond the windows."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import WSMsgType, web

from protocol.frames import INITIAL_WINDOW, ResetCode
from protocol.http_heads import RequestHead, ResponseHead, field_values
from tests.test_bridge import TIMEOUT, Pair, make_pair, start_service
from workers.bridge import ServiceAddress
from workers.errors import HttpStreamReset
from workers.http_streams import READ_SIZE, STREAM_SEND_HIGH, HttpExchange

__all__ = ["make_pair"]  # the fixture, imported for its side effect

MakePair = Callable[[dict[str, ServiceAddress]], Awaitable[Pair]]
MiB = 1024 * 1024


def pattern(size: int, seed: int = 7) -> bytes:
    return hashlib.shake_256(seed.to_bytes(4, "big")).digest(size)


@dataclass
class App:
    """What the aiohttp service saw, and the levers the tests pull."""

    address: ServiceAddress
    requests: list[web.Request] = field(default_factory=list)
    peers: list[int] = field(default_factory=list)  # the device's source port, per request
    next_event: asyncio.Event = field(default_factory=asyncio.Event)
    written: int = 0  # bytes /endless managed to write


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    big = tmp_path / "big.bin"
    big.write_bytes(pattern(3 * MiB + 11))
    state: App | None = None

    async def hello(request: web.Request) -> web.Response:
        assert state is not None
        state.requests.append(request)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        state.peers.append(peer[1] if peer else 0)
        return web.Response(text="hello", headers={"X-Seen-Host": request.host})

    async def upload(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        te = request.headers.get("Transfer-Encoding", "-")
        return web.Response(text=f"{size} {digest.hexdigest()} {te}")

    async def events(request: web.Request) -> web.StreamResponse:
        assert state is not None
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for seq in range(3):
            # The next event waits for the test to have received this one: an
            # event held back anywhere on the way would hang the test.
            state.next_event.clear()
            await response.write(f"id: {seq}\ndata: event {seq}\n\n".encode())
            if seq < 2:
                await state.next_event.wait()
        await response.write_eof()
        return response

    async def endless(request: web.Request) -> web.StreamResponse:
        assert state is not None
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        chunk = bytes(64 * 1024)
        for _ in range(1024):  # 64 MiB at most
            await response.write(chunk)  # drains: blocks while the reader does not read
            state.written += len(chunk)
        await response.write_eof()
        return response

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere?x=1")

    async def no_content(request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def file(request: web.Request) -> web.FileResponse:
        return web.FileResponse(big)

    async def echo_ws(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await ws.send_str("echo: " + message.data)
        return ws

    application = web.Application()
    application.router.add_get("/hello", hello)
    application.router.add_post("/upload", upload)
    application.router.add_get("/events", events)
    application.router.add_get("/endless", endless)
    application.router.add_get("/redirect", redirect)
    application.router.add_get("/no-content", no_content)
    application.router.add_get("/big.bin", file)
    application.router.add_get("/ws", echo_ws)
    runner = web.AppRunner(application, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state = App(ServiceAddress("127.0.0.1", port))
    yield state
    await runner.cleanup()


async def fetch(
    pair: Pair,
    target: str,
    *,
    method: str = "GET",
    headers: tuple[tuple[bytes, bytes], ...] = (),
    body: bytes | None = None,
    service: str = "web",
) -> tuple[ResponseHead, bytes]:
    exchange = pair.client.http.open(service, RequestHead(method, target, headers))
    if body:
        for offset in range(0, len(body), 100_000):
            await exchange.write(body[offset : offset + 100_000])
    exchange.end()
    head = await asyncio.wait_for(exchange.response(), TIMEOUT)
    return head, await asyncio.wait_for(exchange.read_all(), TIMEOUT)


def header(head: ResponseHead, name: bytes) -> bytes | None:
    values = field_values(head.headers, name)
    return values[0] if values else None


async def test_get_reuses_a_kept_alive_connection(make_pair: MakePair, app: App) -> None:
    pair = await make_pair({"web": app.address})
    for _ in range(3):
        head, body = await fetch(
            pair, "/hello", headers=((b"host", b"evil.example"), (b"connection", b"close"))
        )
        assert (head.status, head.reason, body) == (200, b"OK", b"hello")
        # Host is the service's, whatever the client said.
        assert header(head, b"x-seen-host") == f"127.0.0.1:{app.address.port}".encode()
    assert len(set(app.peers)) == 1, app.peers  # one connection, kept alive
    assert pair.device.http.pool.opened == 1
    assert all("Connection" not in r.headers for r in app.requests)
    assert len(pair.device.http) == len(pair.client.http) == 0  # every exchange forgotten


async def test_concurrent_requests_each_get_a_connection(make_pair: MakePair, app: App) -> None:
    pair = await make_pair({"web": app.address})
    results = await asyncio.gather(*(fetch(pair, "/hello") for _ in range(5)))
    assert [body for _, body in results] == [b"hello"] * 5
    assert pair.device.http.pool.opened == len(set(app.peers))
    assert pair.device.http.pool.idle_count(pair_upstream(app)) <= 5


def pair_upstream(app: App) -> object:
    from workers.http_streams import Upstream

    return Upstream(app.address.host, app.address.port)


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_a_large_request_body_is_streamed(
    make_pair: MakePair, app: App, declared: bool
) -> None:
    pair = await make_pair({"web": app.address})
    body = pattern(5 * MiB + 3, seed=2)
    headers = ((b"content-length", str(len(body)).encode()),) if declared else ()
    head, answer = await fetch(pair, "/upload", method="POST", headers=headers, body=body)
    assert head.status == 200
    size, digest, te = answer.decode().split()
    assert (int(size), digest) == (len(body), hashlib.sha256(body).hexdigest())
    assert te == ("-" if declared else "chunked")


async def test_a_large_response_is_intact_and_ranges_pass(make_pair: MakePair, app: App) -> None:
    pair = await make_pair({"web": app.address})
    expected = pattern(3 * MiB + 11)
    head, body = await fetch(pair, "/big.bin")
    assert head.status == 200 and hashlib.sha256(body).digest() == hashlib.sha256(expected).digest()
    assert header(head, b"content-length") == str(len(expected)).encode()
    head, body = await fetch(pair, "/big.bin", headers=((b"range", b"bytes=1000-1999"),))
    assert head.status == 206 and body == expected[1000:2000]
    assert header(head, b"content-range") == f"bytes 1000-1999/{len(expected)}".encode()


async def test_server_sent_events_arrive_one_by_one(make_pair: MakePair, app: App) -> None:
    pair = await make_pair({"web": app.address})
    exchange = pair.client.http.open("web", RequestHead("GET", "/events"))
    exchange.end()
    head = await asyncio.wait_for(exchange.response(), TIMEOUT)
    assert header(head, b"content-type") == b"text/event-stream"
    received = b""
    for seq in range(3):
        while f"data: event {seq}\n\n".encode() not in received:
            received += await asyncio.wait_for(exchange.read(), TIMEOUT)
        app.next_event.set()  # only now does the service write the next one
    assert await asyncio.wait_for(exchange.read(), TIMEOUT) == b""


async def test_redirects_and_bodiless_responses_pass_as_they_are(
    make_pair: MakePair, app: App
) -> None:
    pair = await make_pair({"web": app.address})
    head, _ = await fetch(pair, "/redirect")
    assert head.status == 302 and header(head, b"location") == b"/elsewhere?x=1"
    head, body = await fetch(pair, "/no-content")
    assert (head.status, body) == (204, b"")
    head, body = await fetch(pair, "/big.bin", method="HEAD")
    assert head.status == 200 and body == b""
    assert header(head, b"content-length") == str(3 * MiB + 11).encode()
    etag = header(head, b"etag")
    if etag is not None:
        head, body = await fetch(pair, "/big.bin", headers=((b"if-none-match", etag),))
        assert (head.status, body) == (304, b"")
    assert pair.device.http.pool.opened == 1  # all of it on one kept-alive connection


async def test_refusals_are_resets_with_a_code(make_pair: MakePair, app: App) -> None:
    async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n")
        await writer.drain()
        writer.close()

    ssh, ssh_address = await start_service(not_http)
    gone, gone_address = await start_service(not_http)
    gone.close()
    await gone.wait_closed()
    pair = await make_pair({"web": app.address, "ssh": ssh_address, "gone": gone_address})
    cases = [
        ("admin", ResetCode.UNKNOWN_SERVICE, "not exposed"),
        ("ssh", ResetCode.BAD_GATEWAY, "answer"),
        ("gone", ResetCode.CONNECT_FAILED, "cannot connect"),
    ]
    for service, code, reason in cases:
        with pytest.raises(HttpStreamReset) as caught:
            await fetch(pair, "/", service=service)
        assert caught.value.code == code and reason in caught.value.reason, caught.value
        assert caught.value.remote
    ssh.close()


async def test_a_slow_reader_holds_the_service_back(make_pair: MakePair, app: App) -> None:
    pair = await make_pair({"web": app.address})
    exchange = pair.client.http.open("web", RequestHead("GET", "/endless"))
    exchange.end()
    await asyncio.wait_for(exchange.response(), TIMEOUT)
    # Read nothing until the service is stuck: the windows and buffers filled.
    last = -1
    for _ in range(200):
        if app.written == last and unread(exchange) >= INITIAL_WINDOW // 2:
            break
        last = app.written
        await asyncio.sleep(0.1)  # the service's pace, observed; not a synchronisation
    print(f"\nstalled: service wrote {app.written / MiB:.1f} MiB, {unread(exchange)} unread here")
    assert unread(exchange) <= INITIAL_WINDOW
    assert pair.device.mux.pending_bytes(exchange.stream_id) <= STREAM_SEND_HIGH + READ_SIZE
    assert app.written < 16 * MiB  # sockets' buffers, not the body (64 MiB)
    total = 0
    while chunk := await asyncio.wait_for(exchange.read(), TIMEOUT):
        total += len(chunk)
    assert total == 64 * MiB


def unread(exchange: HttpExchange) -> int:
    return sum(len(chunk) for chunk in exchange._chunks)


async def test_client_reset_aborts_the_request(make_pair: MakePair, app: App) -> None:
    pair = await make_pair({"web": app.address})
    exchange = pair.client.http.open("web", RequestHead("GET", "/endless"))
    exchange.end()
    await asyncio.wait_for(exchange.response(), TIMEOUT)
    await asyncio.wait_for(exchange.read(), TIMEOUT)
    exchange.reset()
    with pytest.raises(HttpStreamReset):
        await exchange.read()
    _, body = await fetch(pair, "/hello")  # the session goes on
    assert body == b"hello"
    assert pair.device.http.pool.opened == 2  # the reset connection was not reused


def ws_frame(text: str) -> bytes:
    payload = text.encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x81, 0x80 | len(payload)) + mask + masked


async def test_websocket_upgrade_switches_to_raw_bytes(make_pair: MakePair, app: App) -> None:
    pair = await make_pair({"web": app.address})
    key = base64.b64encode(os.urandom(16))
    exchange = pair.client.http.open(
        "web",
        RequestHead(
            "GET",
            "/ws",
            (
                (b"connection", b"Upgrade"),
                (b"upgrade", b"websocket"),
                (b"sec-websocket-key", key),
                (b"sec-websocket-version", b"13"),
            ),
        ),
    )
    head = await asyncio.wait_for(exchange.response(), TIMEOUT)
    assert head.status == 101 and header(head, b"upgrade") == b"websocket"
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    assert header(head, b"sec-websocket-accept") == accept
    await exchange.write(ws_frame("ping through the tunnel"))
    received = b""
    while len(received) < 2 + len("echo: ping through the tunnel"):
        received += await asyncio.wait_for(exchange.read(), TIMEOUT)
    assert received == b"\x81\x1d" + b"echo: ping through the tunnel"
    exchange.reset()


async def test_session_end_fails_open_exchanges(make_pair: MakePair, app: App) -> None:
    pair = await make_pair({"web": app.address})
    exchange = pair.client.http.open("web", RequestHead("GET", "/endless"))
    exchange.end()
    await asyncio.wait_for(exchange.response(), TIMEOUT)
    pair.client.close()
    with pytest.raises(HttpStreamReset, match="tunnel closed"):
        while await exchange.read():
            pass


async def test_hop_by_hop_fields_do_not_reach_the_service(make_pair: MakePair) -> None:
    seen: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def capture(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.set_result(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n")
        writer.write(b"Keep-Alive: timeout=5\r\nX-Kept: yes\r\n\r\nok")
        await writer.drain()

    server, address = await start_service(capture)
    pair = await make_pair({"web": address})
    head, body = await fetch(
        pair,
        "/path?q=1",
        method="OPTIONS",
        headers=(
            (b"connection", b"x-private"),
            (b"x-private", b"1"),
            (b"keep-alive", b"1"),
            (b"proxy-authorization", b"secret"),
            (b"te", b"trailers"),
            (b"expect", b"100-continue"),
            (b"accept", b"a"),
            (b"accept", b"b"),
        ),
    )
    request = await asyncio.wait_for(seen, TIMEOUT)
    assert (
        request
        == (
            f"OPTIONS /path?q=1 HTTP/1.1\r\nhost: 127.0.0.1:{address.port}\r\n"
            "accept: a\r\naccept: b\r\n\r\n"
        ).encode()
    )
    assert head.headers == ((b"content-length", b"2"), (b"x-kept", b"yes"))
    assert body == b"ok"
    server.close()


async def test_a_body_shorter_than_its_content_length_is_a_protocol_reset(
    make_pair: MakePair, app: App
) -> None:
    pair = await make_pair({"web": app.address})
    exchange = pair.client.http.open(
        "web", RequestHead("POST", "/upload", ((b"content-length", b"10"),))
    )
    await exchange.write(b"12345")
    exchange.end()
    with pytest.raises(HttpStreamReset) as caught:
        await asyncio.wait_for(exchange.response(), TIMEOUT)
    assert caught.value.code == ResetCode.PROTOCOL and "request body" in caught.value.reason


async def test_kept_alive_connections_the_service_closes_are_not_used(
    make_pair: MakePair,
) -> None:
    """A service that closes each connection right after its response, without
    saying so: the next request must still get its answer, on a new connection."""
    connections = 0

    async def one_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server, address = await start_service(one_answer)
    pair = await make_pair({"web": address})
    for _ in range(5):
        head, body = await fetch(pair, "/")
        assert (head.status, body) == (200, b"ok")
    assert connections == 5
    assert pair.device.stats.bytes_out == pair.client.stats.bytes_in == 10
    web = pair.device.service_stats["web"]  # the figures the metrics show by service
    assert (web.bytes_out, web.streams_opened) == (10, 5)
    server.close()


async def test_an_early_answer_stops_the_upload(make_pair: MakePair, app: App) -> None:
    """A service that refuses an upload without reading it (413): the client gets
    the answer, then a RESET CANCEL that stops its upload (§2.8)."""

    finished = asyncio.Event()

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nbig!")
        await writer.drain()
        await finished.wait()  # never reads the body
        writer.close()

    server, address = await start_service(refuse)
    pair = await make_pair({"web": address, "app": app.address})
    body = bytes(64 * MiB)
    exchange = pair.client.http.open(
        "web", RequestHead("PUT", "/file", ((b"content-length", str(len(body)).encode()),))
    )

    async def upload() -> None:
        for offset in range(0, len(body), MiB):
            await exchange.write(body[offset : offset + MiB])
        exchange.end()

    uploading = asyncio.ensure_future(upload())
    head = await asyncio.wait_for(exchange.response(), TIMEOUT)
    assert (head.status, await asyncio.wait_for(exchange.read_all(), TIMEOUT)) == (413, b"big!")
    with pytest.raises(HttpStreamReset) as caught:
        await asyncio.wait_for(uploading, TIMEOUT)
    assert caught.value.code == ResetCode.CANCEL and caught.value.remote
    _, answer = await fetch(pair, "/hello", service="app")  # the session goes on
    assert answer == b"hello"
    finished.set()
    server.close()
