"""The browser client's files as the signaling server serves them (signaling/web.py)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest
from websockets.datastructures import Headers
from websockets.http11 import Request

from signaling import web
from signaling.server import SignalingServer


def get(path: str, method: str = "GET", **headers: str) -> tuple[int, Headers, bytes]:
    request = Request(path, Headers({"Host": "127.0.0.1:8000", **headers}), method=method)
    response = web.respond(request)
    return response.status_code, response.headers, response.body


@pytest.mark.parametrize(
    ("path", "file", "content_type"),
    [
        ("/", "index.html", "text/html; charset=utf-8"),
        ("/?x=1", "index.html", "text/html; charset=utf-8"),
        ("/sw.js", "sw.js", "text/javascript; charset=utf-8"),
        ("/static/shell.js", "shell.js", "text/javascript; charset=utf-8"),
        ("/static/style.css", "style.css", "text/css; charset=utf-8"),
        ("/static/ws-shim.js", "ws-shim.js", "text/javascript; charset=utf-8"),
        ("/static/cookies.js", "cookies.js", "text/javascript; charset=utf-8"),
        ("/d/dev1/web/", "shell.html", "text/html; charset=utf-8"),
        ("/d/dev1/web/deep/page.html?q=1", "shell.html", "text/html; charset=utf-8"),
        ("/d/dev-1.a/admin_ui", "shell.html", "text/html; charset=utf-8"),
    ],
)
def test_serves_the_fixed_files(path: str, file: str, content_type: str) -> None:
    status, headers, body = get(path)
    assert status == 200
    assert body == (web.default_root() / file).read_bytes()
    assert headers["Content-Type"] == content_type
    assert headers["Content-Length"] == str(len(body))
    assert headers["Content-Security-Policy"] == web.CSP
    assert "script-src 'self';" in web.CSP and "unsafe" not in web.CSP
    assert headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize(
    "path",
    [
        "/index.html",
        "/static/../web/index.html",
        "/static/%2e%2e/signaling/server.py",
        "/../../etc/passwd",
        "/static/",
        "/static/shell.html",
        "/d/",
        "/d/dev1",
        "/d/../static/shell.js",
        "/d/-bad/web/",
        "/pyproject.toml",
    ],
)
def test_anything_else_is_404(path: str) -> None:
    status, headers, body = get(path)
    assert (status, body) == (404, b"Not Found\n")
    assert headers["Content-Security-Policy"] == web.CSP


def test_head_has_no_body_and_other_methods_are_refused() -> None:
    status, headers, body = get("/", method="HEAD")
    assert (status, body) == (200, b"")
    assert int(headers["Content-Length"]) > 0
    status, headers, _ = get("/", method="POST")
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"


def test_root_relative_navigation_of_an_app_goes_back_under_its_prefix() -> None:
    referer = "http://127.0.0.1:8000/d/dev1/web/pages/a.html"
    status, headers, _ = get("/about?x=1", Referer=referer)
    assert status == 307
    assert headers["Location"] == "/d/dev1/web/about?x=1"
    # Another origin's page, or a page that is not an app's, gets nothing.
    assert get("/about", Referer="http://evil.example/d/dev1/web/")[0] == 404
    assert get("/about", Referer="http://127.0.0.1:8000/")[0] == 404
    assert get("/about")[0] == 404


async def http_get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


@pytest.fixture
async def server() -> AsyncIterator[SignalingServer]:
    async with SignalingServer(secrets.token_hex(32), port=0) as running:
        yield running


async def test_the_signaling_port_serves_the_page(server: SignalingServer) -> None:
    data = await http_get(server.port, "/")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Security-Policy: default-src 'none';" in head
    assert body == (web.default_root() / "index.html").read_bytes()
    assert (await http_get(server.port, "/nope")).startswith(b"HTTP/1.1 404 ")
