"""The device-side web app that the browser client tests open through the tunnel.

A real HTTP/1.1 server (http.server, threads) with a multi-file app: an HTML
page, a JS module that imports another, a stylesheet, a PNG image (linked
root-relative), a JSON resource, a form POST answered with a redirect, a login that sets cookies, a
32 MiB download (with range requests) and a Server-Sent Events stream that writes each event only
once the page has acknowledged the previous one (so events arriving one by one
is what the test sees, not a timing guess).
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import random
import re
import struct
import threading
import zlib
from urllib.parse import parse_qs, urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.sync.server import Server, ServerConnection, serve

#: Debian's chromium, driven by Playwright's Python client (never a downloaded browser).
CHROMIUM = "/usr/bin/chromium"
READY = 30.0
WAIT_MS = 30_000
BIG_SIZE = 32 * 1024 * 1024
SSE_EVENTS = 5
ACK_TIMEOUT = 30.0


def png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A valid PNG of one colour (RFC 2083), built here so its bytes are known."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + bytes(rgb) * width
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


LOGO = png(3, 2, (200, 40, 10))
INDEX = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>Device app</title>
<link rel="stylesheet" href="style.css">
<script type="module" src="app.js"></script></head>
<body>
<h1 id="title">Hello from the device</h1>
<img id="logo" src="/img/logo.png" alt="logo">
<p id="module">module not loaded</p>
<p><a id="about" href="/about?from=index">about</a></p>
<ul id="items"></ul>
<form id="upload" method="post" action="submit" enctype="text/plain">
<textarea name="text" id="text"></textarea><button type="submit" id="send">Send</button>
</form>
</body></html>
"""
APP_JS = b"""import { shout } from "./lib/shout.js";
document.getElementById("module").textContent = shout("module loaded");
const response = await fetch("data.json");
const data = await response.json();
for (const item of data.items) {
  const li = document.createElement("li");
  li.textContent = item;
  document.getElementById("items").append(li);
}
document.body.dataset.ready = "yes";
"""
SHOUT_JS = b'export function shout(text) { return text.toUpperCase() + "!"; }\n'
STYLE = b"#title { color: rgb(1, 2, 3); }\n"
DATA = json.dumps({"items": ["alpha", "beta", "gamma"]}).encode()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: AppServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        files = {
            "/": (INDEX, "text/html; charset=utf-8"),
            "/app.js": (APP_JS, "text/javascript"),
            "/lib/shout.js": (SHOUT_JS, "text/javascript"),
            "/style.css": (STYLE, "text/css"),
            "/img/logo.png": (LOGO, "image/png"),
            "/data.json": (DATA, "application/json"),
            "/big": (self.server.big, "application/octet-stream"),
        }
        ranged = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        if url.path == "/big" and ranged:
            first, last = int(ranged.group(1)), int(ranged.group(2))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {first}-{last}/{len(self.server.big)}")
            self.send_header("Content-Length", str(last - first + 1))
            self.end_headers()
            self.wfile.write(self.server.big[first : last + 1])
        elif url.path in files:
            self._send(200, *files[url.path])
        elif url.path == "/done":
            query = parse_qs(url.query)
            page = (
                f"<!doctype html><title>done</title><p id='result'>received "
                f"{query['n'][0]} bytes, sha256 {query['sha'][0]}</p>"
            )
            self._send(200, page.encode(), "text/html; charset=utf-8")
        elif url.path == "/gz":
            # Compressed whatever the request asked for, as some servers do.
            self.send_response(200)
            body = gzip.compress(DATA)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif url.path in ("/no-framing-xfo", "/no-framing-csp"):
            page = f"<!doctype html><p id='unframed'>{url.path} shown anyway</p>".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            if url.path.endswith("xfo"):
                self.send_header("X-Frame-Options", "DENY")
            else:
                self.send_header("Content-Security-Policy", "frame-ancestors 'none'")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
        elif url.path == "/about":
            page = f"<!doctype html><title>about</title><p id='about-page'>{url.query}</p>"
            self._send(200, page.encode(), "text/html; charset=utf-8")
        elif url.path.endswith("/whoami"):
            self._send(200, self.headers.get("Cookie", "").encode(), "text/plain")
        elif url.path == "/logout":
            self.send_response(200)
            self.send_header("Set-Cookie", "session=; Path=/; Max-Age=0")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif url.path == "/events":
            self._events()
        elif url.path == "/ack":
            self.server.acks.release()
            self._send(204, b"", "text/plain")
        else:
            self._send(404, b"not found\n", "text/plain")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        if urlsplit(self.path).path == "/login":
            self.send_response(303)
            self.send_header("Set-Cookie", "session=s3cr3t; Path=/; HttpOnly")
            self.send_header("Set-Cookie", "theme=dark; Path=/lib")
            self.send_header("Location", "/whoami")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if urlsplit(self.path).path != "/submit":
            self._send(404, b"not found\n", "text/plain")
            return
        self.server.posted.append(body)
        # Root-relative, as many apps answer: the client must keep it in the app.
        digest = hashlib.sha256(body).hexdigest()
        self.send_response(303)
        self.send_header("Location", f"/done?n={len(body)}&sha={digest}")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for number in range(1, SSE_EVENTS + 1):
            event = f"id: {number}\ndata: event {number}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
            # The next event is written only once the page has the previous one.
            if not self.server.acks.acquire(timeout=ACK_TIMEOUT):
                break
        self.wfile.write(b"0\r\n\r\n")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        if status != 204:
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class AppServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        self.big = random.Random(11).randbytes(BIG_SIZE)
        self.big_sha256 = hashlib.sha256(self.big).hexdigest()
        self.posted: list[bytes] = []
        self.acks = threading.Semaphore(0)
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


CHAT_PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>chat</title></head>
<body><p id="chat">chat app</p></body></html>
"""


def _chat_page(connection: ServerConnection, request: Request) -> Response | None:
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return None
    headers = Headers({"Content-Type": "text/html; charset=utf-8"})
    headers["Content-Length"] = str(len(CHAT_PAGE))
    return Response(200, "OK", headers, CHAT_PAGE)


def _echo(connection: ServerConnection) -> None:
    """Echo every message back; "bye" closes with 4000, from the server's side."""
    for message in connection:
        if message == "bye":
            connection.close(4000, "server says bye")
            return
        connection.send(message)


def chat_server() -> Server:
    """A WebSocket echo service (the websockets library) that also serves a page."""
    return serve(
        _echo,
        "127.0.0.1",
        0,
        process_request=_chat_page,
        subprotocols=["echo.v1"],
        max_size=16 * 1024 * 1024,
    )
