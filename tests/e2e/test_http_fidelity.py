"""HTTP through the tunnel is the same bytes as HTTP direct, with real servers and clients.

Servers we did not write (Debian's nginx; aiohttp.web where nginx would need
extra modules) sit behind a ``tunnelctl start`` device; each request is sent
twice, straight to the server and through a ``tunnelctl connect`` forward, as
the same bytes, and the two captures (status line, headers, chunk framing,
body) must be equal once their ``Date`` headers are normalized
(``http_support.normalize_date``: the one header two otherwise identical
responses a second apart legitimately differ in).

Clients: a plain socket (exact request bytes, pipelining, 100-continue by the
book), curl (``--raw -D -``: nothing decoded) and aiohttp's client. Streaming:
server-sent events must arrive one by one, and a long poll must outlive common
60 s idle timeouts. One test drives the device with an in-process client that
opens its first stream as the DataChannel opens (a regression test: the device
once dropped it).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import pytest
from aiortc import RTCDataChannel

import workers.client
from protocol.frames import Data, Open, Reset, ResetCode, decode_message, encode_frame
from tests.e2e.conftest import READY, Tunnel
from tests.e2e.http_support import (
    CHUNK_SIZES,
    CHUNKED_BODY,
    HOST,
    SITE,
    SSE_CONTENT_TYPE,
    AiohttpServer,
    Endpoints,
    Nginx,
    assert_same_response,
    curl,
    dechunk,
    raw_exchange,
    raw_expect_continue,
    request,
    require_program,
    split_head,
)
from workers.client import ClientTunnel
from workers.peer import PeerSession

pytestmark = pytest.mark.e2e

GZIP = ("Accept-Encoding", "gzip")


def _expose(tunnel: Tunnel, address: str) -> Endpoints:
    tunnel.start_device("dev1", expose=f"web=http://{address}").wait_line("registered ", READY)
    _, forwarded = tunnel.forward("dev1", "web")
    return Endpoints(direct=address, tunneled=forwarded)


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    with Nginx(require_program("nginx"), tmp_path / "nginx") as server:
        yield server


@pytest.fixture
def via_nginx(tunnel: Tunnel, nginx: Nginx) -> Endpoints:
    return _expose(tunnel, nginx.address)


@pytest.fixture
def via_aiohttp(tunnel: Tunnel) -> Iterator[Endpoints]:
    with AiohttpServer() as server:
        yield _expose(tunnel, server.address)


def _both(endpoints: Endpoints, data: bytes) -> tuple[bytes, bytes]:
    return raw_exchange(endpoints.direct, data), raw_exchange(endpoints.tunneled, data)


def _same_raw(endpoints: Endpoints, case: str, data: bytes) -> bytes:
    """Send ``data`` both ways, assert the captures match, return the tunneled one."""
    direct, tunneled = _both(endpoints, data)
    assert_same_response(case, direct, tunneled)
    return tunneled


def _header(head: bytes, name: str) -> str | None:
    prefix = name.lower().encode() + b": "
    for line in head.split(b"\r\n")[1:]:
        if line.lower().startswith(prefix):
            return line[len(prefix) :].decode("latin-1")
    return None


# -- nginx ------------------------------------------------------------------------


def test_static_get_and_head_are_byte_identical(via_nginx: Endpoints) -> None:
    cases = {
        "GET html": request("GET", "/index.html"),
        "GET binary": request("GET", "/data.bin"),
        "GET gzip_static": request("GET", "/style.css", (GZIP,)),
        "HEAD": request("HEAD", "/index.html"),
        "HEAD of a gzipped, chunked response": request("HEAD", "/page.txt", (GZIP,)),
        "GET 404": request("GET", "/missing.html"),
    }
    got = {case: _same_raw(via_nginx, case, data) for case, data in cases.items()}

    head, body = split_head(got["GET binary"])
    assert head.startswith(b"HTTP/1.1 200 ") and body == SITE["data.bin"]
    head, body = split_head(got["GET gzip_static"])
    assert _header(head, "Content-Encoding") == "gzip"
    assert _header(head, "Content-Length") == str(len(body))
    assert gzip.decompress(body) == SITE["style.css"]
    for case in ("HEAD", "HEAD of a gzipped, chunked response"):
        head, body = split_head(got[case])
        assert head.startswith(b"HTTP/1.1 200 ") and body == b"", case
    assert got["GET 404"].startswith(b"HTTP/1.1 404 ")


def test_chunked_gzip_and_ssi_responses_are_byte_identical(via_nginx: Endpoints) -> None:
    """nginx answers chunked when it compresses on the fly, and for SSI pages."""
    gzipped = _same_raw(via_nginx, "gzip on the fly", request("GET", "/page.txt", (GZIP,)))
    head, body = split_head(gzipped)
    assert _header(head, "Transfer-Encoding") == "chunked"
    assert body.count(b"\r\n") > 4  # several chunks, not one
    assert gzip.decompress(dechunk(body)) == SITE["page.txt"]

    ssi = _same_raw(via_nginx, "SSI", request("GET", "/ssi/page.html"))
    head, body = split_head(ssi)
    assert _header(head, "Transfer-Encoding") == "chunked"
    assert SITE["ssi/part.html"] in dechunk(body)

    # curl decodes what it got through the tunnel back to the file.
    out, _ = curl("--compressed", f"http://{via_nginx.tunneled}/page.txt", raw=False)
    assert out == SITE["page.txt"]


def test_conditional_requests_get_identical_304(via_nginx: Endpoints) -> None:
    head, _ = split_head(raw_exchange(via_nginx.direct, request("GET", "/index.html")))
    etag, modified = _header(head, "ETag"), _header(head, "Last-Modified")
    assert etag and modified
    for case, validator in (
        ("If-None-Match", ("If-None-Match", etag)),
        ("If-Modified-Since", ("If-Modified-Since", modified)),
    ):
        response = _same_raw(via_nginx, case, request("GET", "/index.html", (validator,)))
        head, body = split_head(response)
        assert head.startswith(b"HTTP/1.1 304 "), case
        assert body == b"", case


def test_204_and_redirects_are_byte_identical_and_followed(via_nginx: Endpoints) -> None:
    no_content = _same_raw(via_nginx, "204", request("GET", "/no-content"))
    assert no_content.startswith(b"HTTP/1.1 204 ") and no_content.endswith(b"\r\n\r\n")
    moved = _same_raw(via_nginx, "301", request("GET", "/moved"))
    assert _header(split_head(moved)[0], "Location") == (
        f"http://{HOST}:{via_nginx.direct.rsplit(':', 1)[1]}/index.html"
    )  # nginx names its own port: a real server behind a port forward does that
    found = _same_raw(via_nginx, "302", request("GET", "/found"))
    assert _header(split_head(found)[0], "Location") == "/index.html"

    # curl follows the relative redirect through the tunnel.
    out, _ = curl("-L", f"http://{via_nginx.tunneled}/found")
    assert out.endswith(b"\r\n\r\n" + SITE["index.html"])
    assert out.startswith(b"HTTP/1.1 302 ") and b"\r\nHTTP/1.1 200 OK\r\n" in out


def test_pipelined_keep_alive_requests_are_byte_identical(via_nginx: Endpoints) -> None:
    """Five requests written at once on one connection; the last one closes it."""
    pipeline = b"".join(
        [
            request("GET", "/index.html", close=False),
            request("HEAD", "/style.css", (GZIP,), close=False),
            request("GET", "/page.txt", (GZIP,), close=False),  # chunked
            request("GET", "/no-content", close=False),
            request("GET", "/data.bin"),
        ]
    )
    tunneled = _same_raw(via_nginx, "pipelined keep-alive", pipeline)
    assert tunneled.count(b"HTTP/1.1 200 OK\r\n") == 4
    assert tunneled.count(b"HTTP/1.1 204 No Content\r\n") == 1
    assert tunneled.endswith(SITE["data.bin"])


def test_curl_keeps_one_connection_for_sequential_requests(via_nginx: Endpoints) -> None:
    paths = ("/index.html", "/page.txt", "/no-content", "/style.css", "/data.bin")
    args = ["--compressed", "-w", "%{stderr}%{num_connects}\n"]
    captures = []
    for address in (via_nginx.direct, via_nginx.tunneled):
        urls = [f"http://{address}{path}" for path in paths]
        out, err = curl(*args, *urls)
        # One TCP connect, then four requests on the same connection.
        assert err.split() == ["1", "0", "0", "0", "0"], (address, err)
        captures.append(out)
    assert_same_response("curl keep-alive", *captures)


async def test_aiohttp_client_keep_alive_decoding_and_100_continue(
    via_nginx: Endpoints, nginx: Nginx
) -> None:
    """A real async client: one pooled connection, gzip decoded, an upload with
    ``Expect: 100-continue``; same statuses, headers (but Date) and bodies."""
    upload = SITE["data.bin"] * 5  # 1 MB
    uploaded = nginx.site / "dav" / "up.bin"
    results = []
    for address in (via_nginx.direct, via_nginx.tunneled):
        uploaded.unlink(missing_ok=True)  # both PUTs create it: 201 both ways
        connects = 0

        async def count(*_: object) -> None:
            nonlocal connects
            connects += 1

        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(count)
        seen = []
        async with aiohttp.ClientSession(
            f"http://{address}",
            connector=aiohttp.TCPConnector(limit=1),
            headers={"Host": HOST},
            timeout=aiohttp.ClientTimeout(total=READY),
            trace_configs=[trace],
        ) as session:
            for method, path, kwargs in (
                ("GET", "/index.html", {}),
                ("GET", "/page.txt", {}),  # aiohttp asks for gzip and decodes it
                ("HEAD", "/style.css", {}),
                ("GET", "/moved", {"allow_redirects": False}),
                ("GET", "/data.bin", {}),
                ("PUT", "/dav/up.bin", {"data": upload, "expect100": True}),
            ):
                async with session.request(method, path, **kwargs) as response:
                    headers = [(k, v) for k, v in response.raw_headers if k != b"Date"]
                    seen.append((method, path, response.status, headers, await response.read()))
        assert connects == 1, f"{address}: {connects} connections for one keep-alive session"
        assert uploaded.read_bytes() == upload
        results.append(seen)
    direct, tunneled = results
    for want, got in zip(direct, tunneled, strict=True):
        assert got == want, f"{want[:2]}: tunneled response differs"
    bodies = {(m, p): (status, body) for m, p, status, _, body in tunneled}
    assert bodies[("GET", "/page.txt")] == (200, SITE["page.txt"])
    assert bodies[("GET", "/data.bin")] == (200, SITE["data.bin"])
    assert bodies[("PUT", "/dav/up.bin")][0] == 201


def test_large_request_and_response_headers_are_byte_identical(via_nginx: Endpoints) -> None:
    """16 KiB header values fit nginx's 32 KiB ``large_client_header_buffers``;
    a 40 KiB one gets the same 400 both ways."""
    big = "".join(chr(ord("a") + i % 26) for i in range(16 * 1024))
    cookie = "session=" + "c" * (16 * 1024)
    echoed = _same_raw(
        via_nginx,
        "16 KiB headers",
        request("GET", "/echo-header", (("X-Big", big), ("Cookie", cookie), ("X-Pad", big))),
    )
    head, body = split_head(echoed)
    assert head.startswith(b"HTTP/1.1 200 ") and body == b"echoed\n"
    assert _header(head, "X-Echo") == big  # a 16 KiB response header, too

    too_large = _same_raw(
        via_nginx, "40 KiB header", request("GET", "/echo-header", (("X-Big", "x" * 40_960),))
    )
    assert too_large.startswith(b"HTTP/1.1 400 ")
    assert b"Request Header Or Cookie Too Large" in too_large

    out, _ = curl("-H", f"X-Big: {big}", f"http://{via_nginx.tunneled}/echo-header")
    assert f"\r\nX-Echo: {big}\r\n".encode() in out


def test_expect_100_continue_upload_is_byte_identical(via_nginx: Endpoints, nginx: Nginx) -> None:
    """The interim ``100 Continue`` crosses the tunnel before the body is sent."""
    body = SITE["data.bin"]
    head = request(
        "PUT",
        "/dav/upload.bin",
        (("Expect", "100-continue"), ("Content-Length", str(len(body)))),
    )
    uploaded = nginx.site / "dav" / "upload.bin"
    captures = []
    for address in (via_nginx.direct, via_nginx.tunneled):
        uploaded.unlink(missing_ok=True)  # so both PUTs create it: 201 both ways
        captures.append(raw_expect_continue(address, head, body))
        assert uploaded.read_bytes() == body
    assert_same_response("100-continue upload", *captures)
    assert captures[1].startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\n")

    # curl, which waits for the 100 (up to --expect100-timeout) before its body.
    source = nginx.root / "upload-source.bin"
    source.write_bytes(body)
    captures = []
    for address in (via_nginx.direct, via_nginx.tunneled):
        uploaded.unlink(missing_ok=True)
        out, _ = curl(
            *("-T", str(source), "-H", "Expect: 100-continue", "--expect100-timeout", "20"),
            f"http://{address}/dav/upload.bin",
        )
        assert uploaded.read_bytes() == body
        captures.append(out)
    assert_same_response("curl 100-continue upload", *captures)
    assert captures[1].startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\n")


def _eager_peer(first_request: bytes, answer: asyncio.Future[bytes]) -> type[PeerSession]:
    """A client ``PeerSession`` that opens stream 1 inside the "datachannel"
    callback, as a browser may in ``ondatachannel``, and resolves ``answer``
    with the response head (or fails it with the device's RESET)."""

    class EagerPeer(PeerSession):
        def _remote_channel(self, channel: RTCDataChannel) -> None:
            received = bytearray()

            def on_message(message: bytes | str) -> None:
                if answer.done() or isinstance(message, str):
                    return
                for frame in decode_message(message):
                    if frame.stream_id != 1:
                        continue
                    if isinstance(frame, Reset):
                        answer.set_exception(
                            AssertionError(
                                f"the device reset the first stream: "
                                f"{ResetCode(frame.code).name}: {frame.reason}"
                            )
                        )
                        return
                    if isinstance(frame, Data):
                        received.extend(frame.data)
                        if b"\r\n\r\n" in received:  # a bodiless response is complete
                            answer.set_result(bytes(received))
                            return

            channel.on("message", on_message)
            # The client's first stream is 1 (odd ids, PROTOCOL.md §2.3); the
            # OPEN and the request go in two messages, before this callback returns.
            channel.send(encode_frame(Open(1, "web")))
            channel.send(encode_frame(Data(1, first_request)))
            super()._remote_channel(channel)

    return EagerPeer


async def test_stream_opened_with_the_channel_is_answered(
    tunnel: Tunnel, nginx: Nginx, loopback_ice: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client may open its first stream the moment the DataChannel opens: a
    browser in ``ondatachannel``, or ``tunnelctl connect`` for a connection that
    reached its port just then. The device must answer it like any other.

    The client is ``ClientTunnel`` in this process, its PeerSession made eager
    (:func:`_eager_peer`); the device is a real ``tunnelctl start``. Three
    sessions, so a pass is not a lucky schedule.
    """
    tunnel.start_device("dev1", expose=f"web=http://{nginx.address}").wait_line(
        "registered ", READY
    )
    ask = request("GET", "/no-content")
    direct = raw_exchange(nginx.address, ask)
    token = tunnel.token("client1", "client", ("dev1",))
    for session in range(1, 4):
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        monkeypatch.setattr(workers.client, "PeerSession", _eager_peer(ask, answer))
        client = ClientTunnel(signal_url=tunnel.signal_url, device="dev1", token=token)
        try:
            await client.open(READY)
            tunneled = await asyncio.wait_for(answer, READY)
        finally:
            await client.close()
        assert_same_response(f"session {session}, first stream", direct, tunneled)


# -- aiohttp.web ----------------------------------------------------------------------


def test_python_chunked_response_is_byte_identical(via_aiohttp: Endpoints) -> None:
    """aiohttp writes one HTTP chunk per write(): the framing must survive as is."""
    tunneled = _same_raw(via_aiohttp, "aiohttp chunked", request("GET", "/chunked"))
    head, body = split_head(tunneled)
    assert _header(head, "Transfer-Encoding") == "chunked"
    assert dechunk(body) == CHUNKED_BODY
    framing = [f"{size:x}\r\n".encode() for size in CHUNK_SIZES]
    assert all(frame in body for frame in framing)

    out, _ = curl(f"http://{via_aiohttp.tunneled}/chunked")
    assert split_head(out)[1] == body


async def _receive_events(address: str, count: int, interval: float) -> list[tuple[dict, float]]:
    """Read ``/events``; return each event's data with the time it was complete here."""
    events: list[tuple[dict, float]] = []
    timeout = aiohttp.ClientTimeout(total=READY + count * interval)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(
            f"http://{address}/events", params={"count": count, "interval": interval}
        ) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"] == SSE_CONTENT_TYPE
        data = None
        async for line in response.content:
            if line.startswith(b"data: "):
                data = json.loads(line[len(b"data: ") :])
            elif line == b"\n" and data is not None:
                events.append((data, time.monotonic()))
                data = None
    return events


async def test_server_sent_events_arrive_one_by_one(via_aiohttp: Endpoints) -> None:
    count, interval = 15, 0.2
    delays_ms: dict[str, list[float]] = {}
    for way, address in (("direct", via_aiohttp.direct), ("tunneled", via_aiohttp.tunneled)):
        events = await _receive_events(address, count, interval)
        assert [data["seq"] for data, _ in events] == list(range(count)), way
        delays_ms[way] = [(arrived - data["emitted"]) * 1000 for data, arrived in events]
        # Streaming, not buffered until the end: every event written at least a
        # second before the last one was here before the last one was written.
        last_emitted = events[-1][0]["emitted"]
        early = [(d, at) for d, at in events if d["emitted"] <= last_emitted - 1.0]
        assert len(early) >= count // 2
        late = [d["seq"] for d, at in early if at >= last_emitted]
        assert not late, f"{way}: events {late} arrived only when the response ended"

    direct_median = statistics.median(delays_ms["direct"])
    added = [delay - direct_median for delay in delays_ms["tunneled"]]
    print(
        f"\nSSE per-event delay over {count} events, {interval * 1000:.0f} ms apart: "
        f"direct median {direct_median:.2f} ms, max {max(delays_ms['direct']):.2f} ms; "
        f"tunneled median {statistics.median(delays_ms['tunneled']):.2f} ms, "
        f"max {max(delays_ms['tunneled']):.2f} ms; "
        f"added by the tunnel: median {statistics.median(added):.2f} ms, max {max(added):.2f} ms"
    )


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_long_poll_answered_after_75_s_completes(via_aiohttp: Endpoints) -> None:
    """A request the server answers after 75 s of silence, longer than common
    60 s idle timeouts, direct and tunneled at the same time."""
    held = request("GET", "/hold?seconds=75")
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=2) as pool:
        direct, tunneled = pool.map(
            lambda address: raw_exchange(address, held, timeout=150),
            (via_aiohttp.direct, via_aiohttp.tunneled),
        )
    elapsed = time.monotonic() - started
    print(f"\nlong poll answered after {elapsed:.1f} s")
    assert elapsed >= 75
    assert_same_response("long poll", direct, tunneled)
    head, body = split_head(tunneled)
    assert head.startswith(b"HTTP/1.1 200 ") and body == b"held for 75 s, then answered\n"
