"""Real HTTP servers and clients for the byte-fidelity tests (``test_http_fidelity.py``).

The servers are programs we did not write, started on a free 127.0.0.1 port and
stopped by pid:

* :class:`Nginx`: Debian's nginx, run with a configuration generated in the
  test's ``tmp_path`` (``daemon off;``, pid, logs and temp files inside it) over
  static files generated there too;
* :class:`AiohttpServer`: an ``aiohttp.web`` application in a thread of the
  test process, for what nginx cannot do without extra modules: chunked output
  of chosen chunk sizes, server-sent events, a long poll.

The clients capture whole responses (status line, headers, body, chunk framing)
as bytes: :func:`raw_exchange` on a plain socket and :func:`curl` with
``--raw -D -``. :func:`assert_same_response` compares a direct capture with
a tunneled one after :func:`normalize_date`, the only normalization (two
responses a second apart legitimately differ in their ``Date`` header).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import grp
import gzip
import json
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pytest
from aiohttp import web

#: The Host header of every request, direct or tunneled: the two requests must be
#: the same bytes for their responses to be comparable (nginx builds absolute
#: redirects and DAV ``Location`` headers from it).
HOST = "fidelity.test"
WAIT = 30.0  # for a server to listen, a response to complete
SSE_CONTENT_TYPE = "text/event-stream"

_DATE = re.compile(
    rb"\r\nDate: (?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d "
    rb"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d GMT\r\n"
)
_NORMALIZED_DATE = b"\r\nDate: <normalized>\r\n"


@dataclass(frozen=True, slots=True)
class Endpoints:
    """One HTTP server reached two ways: directly and through the tunnel."""

    direct: str  # HOST:PORT of the server itself
    tunneled: str  # HOST:PORT of the ``tunnelctl connect`` forward to it


# -- programs -------------------------------------------------------------------


def require_program(name: str) -> str:
    """The path of ``name``, or skip the test when it is not installed.

    Skipping keeps a developer without root (who cannot install Debian
    packages) green; as root in CI, ``scripts/install-system-deps.sh`` has run,
    so a missing program there is an error, never a silent skip.
    """
    path = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))
    if path is not None:
        return path
    reason = f"{name} is not installed (as root: bash scripts/install-system-deps.sh)"
    if os.environ.get("CI") and os.geteuid() == 0:
        pytest.fail(f"{reason}; CI runs as root, so it should have been installed")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    """Return once 127.0.0.1:``port`` accepts; raise if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"nginx exited with {proc.returncode} before listening: {_tail(log)}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"nginx not listening on {port} within {timeout:g} s: {_tail(log)}"
                ) from None
        # A bounded pause between polls of the condition, cut short if nginx exits.
        _wait_exit(proc, 0.05)


def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return " | ".join(text.splitlines()[-lines:]) or "(empty log)"


# -- nginx ------------------------------------------------------------------------


def _text(lines: int, seed: int) -> bytes:
    """Deterministic, compressible text: gzip produces several chunks of it."""
    rng = random.Random(seed)
    words = ["tunnel", "stream", "offer", "answer", "candidate", "frame", "credit", "relay"]
    return b"".join(
        f"{n:06d} {' '.join(rng.choice(words) for _ in range(rng.randint(3, 14)))}\n".encode()
        for n in range(lines)
    )


#: The generated site: path under the root -> content.
SITE: dict[str, bytes] = {
    "index.html": b"<!doctype html>\n<title>fidelity</title>\n" + _text(60, 1),
    "page.txt": _text(6000, 2),  # ~300 KiB: gzipped on the fly, chunked
    "style.css": b"body { margin: 0 }\n" + _text(400, 3),
    "data.bin": random.Random(4).randbytes(200_000),  # every byte value, incompressible
    "ssi/page.html": b'<p>before</p>\n<!--# include file="part.html" -->\n<p>after</p>\n',
    "ssi/part.html": b"<p>included part</p>\n" + _text(200, 5),
}

_NGINX_CONF = """\
daemon off;
worker_processes 1;
{user}
pid {root}/nginx.pid;
error_log {root}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {root}/access.log;
    client_body_temp_path {root}/tmp/body;
    proxy_temp_path {root}/tmp/proxy;
    fastcgi_temp_path {root}/tmp/fastcgi;
    uwsgi_temp_path {root}/tmp/uwsgi;
    scgi_temp_path {root}/tmp/scgi;
    types {{
        text/html html;
        text/plain txt;
        text/css css;
    }}
    default_type application/octet-stream;
    # A 16 KiB header line must fit in one buffer; a 40 KiB one must not.
    large_client_header_buffers 4 32k;
    keepalive_timeout 120s;
    keepalive_requests 1000;
    etag on;
    gzip on;
    gzip_types text/plain text/css;
    gzip_min_length 1;
    gzip_vary on;
    gzip_static on;
    server {{
        listen 127.0.0.1:{port};
        server_name {host};
        root {root}/site;
        location = /no-content {{ return 204; }}
        location = /moved {{ return 301 /index.html; }}
        location = /found {{
            absolute_redirect off;
            return 302 /index.html;
        }}
        location = /echo-header {{
            add_header X-Echo $http_x_big always;
            return 200 "echoed\\n";
        }}
        location /ssi/ {{ ssi on; }}
        location /dav/ {{
            dav_methods PUT DELETE;
            create_full_put_path on;
            client_max_body_size 16m;
        }}
    }}
}}
"""


class Nginx:
    """Debian's nginx on a free 127.0.0.1 port, serving :data:`SITE` from ``root/site``.

    Use as a context manager: entering starts it and waits until it listens;
    leaving stops it by pid (SIGTERM, then SIGKILL to its own process group).
    """

    def __init__(self, binary: str, root: Path) -> None:
        self.binary = binary
        self.root = root
        self.site = root / "site"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def error_log(self) -> Path:
        return self.root / "error.log"

    def __enter__(self) -> Nginx:
        for relative, content in SITE.items():
            path = self.site / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        # gzip_static serves this file, with a Content-Length, instead of compressing.
        (self.site / "style.css.gz").write_bytes(gzip.compress(SITE["style.css"], mtime=0))
        (self.site / "dav").mkdir()
        (self.root / "tmp").mkdir()
        user = ""
        if os.geteuid() == 0:
            # Workers would drop to "nobody", who cannot read pytest's 0700 tmp_path.
            user = (
                f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"
            )
        conf = self.root / "nginx.conf"
        conf.write_text(_NGINX_CONF.format(root=self.root, port=self.port, host=HOST, user=user))
        self.proc = subprocess.Popen(
            [self.binary, "-p", str(self.root), "-c", str(conf), "-e", str(self.error_log)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_listening(self.port, self.proc, WAIT, self.error_log)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # fast shutdown: the master ends its workers
            if not _wait_exit(proc, 10):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the group it leads (new session)
                proc.wait(timeout=10)


# -- aiohttp.web ------------------------------------------------------------------

#: The chunk sizes ``/chunked`` writes, one ``write()`` (one HTTP chunk) each.
CHUNK_SIZES = (1, 2, 15, 16, 255, 4096, 16_384, 65_543, 300_001, 3)
CHUNKED_BODY = random.Random(6).randbytes(sum(CHUNK_SIZES))


async def _chunked(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    offset = 0
    for size in CHUNK_SIZES:
        await response.write(CHUNKED_BODY[offset : offset + size])
        offset += size
    await response.write_eof()
    return response


async def _events(request: web.Request) -> web.StreamResponse:
    """``/events?count=N&interval=S``: N server-sent events, one every S seconds.

    Each event's data carries ``time.monotonic()`` at the moment it is written
    (the clock is system-wide, so the client compares it with its own reading).
    """
    count = int(request.query.get("count", "15"))
    interval = float(request.query.get("interval", "0.2"))
    response = web.StreamResponse(
        headers={"Content-Type": SSE_CONTENT_TYPE, "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    for seq in range(count):
        if seq:
            await asyncio.sleep(interval)  # the server's pace, not a synchronisation
        data = json.dumps({"seq": seq, "emitted": time.monotonic()})
        await response.write(f"id: {seq}\nevent: tick\ndata: {data}\n\n".encode())
    await response.write_eof()
    return response


async def _hold(request: web.Request) -> web.Response:
    """``/hold?seconds=S``: a long poll answered after S seconds of silence."""
    seconds = float(request.query["seconds"])
    await asyncio.sleep(seconds)
    return web.Response(text=f"held for {seconds:g} s, then answered\n")


class AiohttpServer:
    """An ``aiohttp.web`` app on a free 127.0.0.1 port, in a thread with its own loop."""

    def __init__(self) -> None:
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="aiohttp server")
        self._ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> AiohttpServer:
        self._thread.start()
        self.port = self._ready.result(timeout=WAIT)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=WAIT)
        assert not self._thread.is_alive(), "the aiohttp server thread did not stop"

    def _serve(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            self._ready.set_result(loop.run_until_complete(self._start()))
        except BaseException as exc:
            self._ready.set_exception(exc)
            loop.close()
            return
        try:
            loop.run_forever()
        finally:
            assert self._runner is not None
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

    async def _start(self) -> int:
        app = web.Application()
        app.router.add_get("/chunked", _chunked)
        app.router.add_get("/events", _events)
        app.router.add_get("/hold", _hold)
        # Stop promptly even with a long poll in flight.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        return int(self._runner.addresses[0][1])


# -- clients -----------------------------------------------------------------------


def request(
    method: str,
    path: str,
    headers: tuple[tuple[str, str], ...] = (),
    *,
    body: bytes = b"",
    close: bool = True,
) -> bytes:
    """An HTTP/1.1 request as bytes; ``Connection: close`` unless ``close`` is false."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _connect(address: str, timeout: float) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def _read_to_eof(sock: socket.socket, received: bytearray, deadline: float) -> bytes:
    while True:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(received)
        received += chunk
        if time.monotonic() > deadline:
            raise TimeoutError(f"response still open after the deadline; got {len(received)} B")


def raw_exchange(address: str, data: bytes, timeout: float = WAIT) -> bytes:
    """Send ``data`` (one request or several pipelined), return every byte until EOF.

    The last request must carry ``Connection: close``: the server's close is
    how we know the responses are complete, with no HTTP parsing of our own.
    """
    deadline = time.monotonic() + timeout
    with _connect(address, timeout) as sock:
        sock.sendall(data)
        return _read_to_eof(sock, bytearray(), deadline)


def raw_expect_continue(address: str, head: bytes, body: bytes, timeout: float = WAIT) -> bytes:
    """Send a request head with ``Expect: 100-continue``; send ``body`` only after
    the interim ``100 Continue`` response arrives, as RFC 9110 §10.1.1 intends.

    Return the whole transcript; raise if the interim response never comes.
    """
    deadline = time.monotonic() + timeout
    received = bytearray()
    with _connect(address, timeout) as sock:
        sock.sendall(head)
        while b"\r\n\r\n" not in received:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk or time.monotonic() > deadline:
                raise AssertionError(f"no 100 Continue before the body; got {bytes(received)!r}")
            received += chunk
        if not received.startswith(b"HTTP/1.1 100 "):
            raise AssertionError(f"expected an interim 100 response, got {bytes(received)!r}")
        sock.sendall(body)
        return _read_to_eof(sock, received, deadline)


def curl(*args: str, raw: bool = True, timeout: float = WAIT) -> tuple[bytes, str]:
    """Run curl with ``Host: HOST``; return its stdout and stderr.

    ``raw`` (the default) adds ``--raw -D -``: stdout is then the head and the
    undecoded body (chunk framing, gzip) of every response, as received.
    Without it, curl decodes as a user's curl would. ``-w '%{stderr}...'``
    output lands in stderr.
    """
    command = [require_program("curl"), "-sS", "--max-time", f"{timeout:g}", "-H", f"Host: {HOST}"]
    if raw:
        command += ["--raw", "-D", "-"]
    result = subprocess.run(
        [*command, *args], capture_output=True, timeout=timeout + 10, check=False
    )
    assert result.returncode == 0, (
        f"curl exited with {result.returncode}: {result.stderr.decode(errors='replace')}"
    )
    return result.stdout, result.stderr.decode(errors="replace")


# -- comparing -----------------------------------------------------------------------


def normalize_date(response: bytes) -> tuple[bytes, int]:
    """Replace each ``Date`` header's value; return the bytes and how many were replaced.

    Only an exact ``Date: <IMF-fixdate>`` header line matches (RFC 9110 §5.6.7):
    nothing else in a response is rewritten.
    """
    return _DATE.subn(_NORMALIZED_DATE, response)


def assert_same_response(case: str, direct: bytes, tunneled: bytes) -> None:
    """Assert two captures are the same bytes once their Date headers are normalized."""
    direct_norm, direct_dates = normalize_date(direct)
    tunneled_norm, tunneled_dates = normalize_date(tunneled)
    assert direct_dates == tunneled_dates, (
        f"{case}: {direct_dates} Date headers direct, {tunneled_dates} tunneled"
    )
    if direct_norm == tunneled_norm:
        return
    at = next(
        (i for i, (a, b) in enumerate(zip(direct_norm, tunneled_norm, strict=False)) if a != b),
        min(len(direct_norm), len(tunneled_norm)),
    )
    window = slice(max(0, at - 80), at + 80)
    raise AssertionError(
        f"{case}: tunneled response differs from the direct one at byte {at} "
        f"(direct {len(direct)} B, tunneled {len(tunneled)} B)\n"
        f"  direct:   {direct_norm[window]!r}\n  tunneled: {tunneled_norm[window]!r}"
    )


def split_head(response: bytes) -> tuple[bytes, bytes]:
    """The head (status line and headers, without the blank line) and the rest."""
    head, sep, rest = response.partition(b"\r\n\r\n")
    assert sep, f"no end of headers in {response[:200]!r}"
    return head, rest


def dechunk(body: bytes) -> bytes:
    """Decode a complete chunked body (RFC 9112 §7.1); raise on malformed framing."""
    out = bytearray()
    view = memoryview(body)
    offset = 0
    while True:
        end = body.index(b"\r\n", offset)
        size = int(body[offset:end].split(b";")[0], 16)
        offset = end + 2
        if size == 0:
            assert body[offset:] == b"\r\n", (
                f"trailers or junk after the last chunk: {body[offset:]!r}"
            )
            return bytes(out)
        out += view[offset : offset + size]
        offset += size
        assert body[offset : offset + 2] == b"\r\n", f"chunk of {size} B not followed by CRLF"
        offset += 2
