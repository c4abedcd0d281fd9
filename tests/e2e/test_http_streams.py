"""End to end: HTTP streams (PROTOCOL.md §2.8) from a client to a real ``tunnelctl start``.

The device is a real process (signaling server, supervisor, worker) exposing
Debian's nginx (``web``), an aiohttp.web application in the test's own event
loop (``app``, from ``tests/test_http_streams.py``), and a TCP service that
does not speak HTTP (``ssh``). The client is :class:`~workers.client.ClientTunnel`
in this process, opening HTTP streams with ``bridge.http.open`` as the browser
client's Service Worker does with the same frames.

Sizes and rates are printed (``-s``); only generous bounds are asserted.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import Child
from protocol.frames import INITIAL_WINDOW, ResetCode
from protocol.http_heads import RequestHead, ResponseHead, field_values
from tests.e2e.conftest import LOOPBACK, READY, Tunnel
from tests.e2e.http_support import Nginx, require_program
from tests.e2e.large_support import read_status
from tests.test_http_streams import App, app, unread
from workers.bridge import TunnelBridge
from workers.client import ClientTunnel
from workers.errors import HttpStreamReset
from workers.http_streams import HttpExchange

__all__ = ["app"]  # the fixture, imported for its side effect

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
BIG = 32 * MiB
WAIT = 60.0


@dataclass
class Device:
    child: Child
    runtime_dir: str

    def worker_pids(self) -> list[int]:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "tunnelctl",
                "sessions",
                "--json",
                "--runtime-dir",
                self.runtime_dir,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        return [row["worker_pid"] for row in json.loads(out) if row["state"] == "running"]


@dataclass
class Setup:
    bridge: TunnelBridge
    device: Device
    nginx: Nginx
    app: App


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    with Nginx(require_program("nginx"), tmp_path / "nginx") as server:
        # Incompressible, so nothing on the way could shrink it.
        (server.site / "big.bin").write_bytes(random.Random(32).randbytes(BIG))
        yield server


@pytest.fixture
async def setup(tunnel: Tunnel, nginx: Nginx, app: App, loopback_ice: None) -> AsyncIterator[Setup]:
    async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
        await writer.drain()
        await reader.read(100)  # then drop it, as sshd does with garbage
        writer.close()

    ssh = await asyncio.start_server(not_http, "127.0.0.1", 0)
    ssh_port = ssh.sockets[0].getsockname()[1]
    runtime = tempfile.mkdtemp(prefix="tunnelctl-http-")
    exposes = [
        f"web=http://{nginx.address}",
        f"app=http://127.0.0.1:{app.address.port}",
        f"ssh=tcp://127.0.0.1:{ssh_port}",
    ]
    child = Child.tunnelctl(
        ["start", "--runtime-dir", runtime, "--signal", tunnel.signal_url, "--device", "dev1"]
        + [arg for expose in exposes for arg in ("--expose", expose)]
        + LOOPBACK,
        env={"TUNNEL_TOKEN": tunnel.token("dev1", "device")},
        name="device dev1",
    )
    tunnel.children.append(child)  # stopped by pid by the tunnel fixture
    client = None
    try:
        await asyncio.to_thread(child.wait_line, "registered ", READY)
        token = tunnel.token("client1", "client", ("dev1",))
        client = ClientTunnel(signal_url=tunnel.signal_url, device="dev1", token=token)
        started = time.perf_counter()
        await client.open(READY)
        print(f"\nsession open in {time.perf_counter() - started:.2f} s")
        bridge = await client.current_bridge(READY)
        assert bridge is not None
        yield Setup(bridge, Device(child, runtime), nginx, app)
    finally:
        if client is not None:
            await client.close()
        ssh.close()
        shutil.rmtree(runtime, ignore_errors=True)


def header(head: ResponseHead, name: bytes) -> bytes | None:
    values = field_values(head.headers, name)
    return values[0] if values else None


async def fetch(
    bridge: TunnelBridge,
    service: str,
    target: str,
    *,
    method: str = "GET",
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> tuple[ResponseHead, bytes]:
    exchange = bridge.http.open(service, RequestHead(method, target, headers))
    exchange.end()
    head = await asyncio.wait_for(exchange.response(), WAIT)
    return head, await asyncio.wait_for(exchange.read_all(), WAIT)


async def test_get_reuses_one_kept_alive_connection(setup: Setup) -> None:
    for _ in range(4):
        head, body = await fetch(setup.bridge, "app", "/hello")
        assert (head.status, body) == (200, b"hello")
        assert header(head, b"x-seen-host") == f"127.0.0.1:{setup.app.address.port}".encode()
    assert len(set(setup.app.peers)) == 1, setup.app.peers
    head, body = await fetch(setup.bridge, "web", "/index.html")
    assert head.status == 200 and body.startswith(b"<!doctype html>")


async def test_a_32_mib_download_is_intact(setup: Setup) -> None:
    expected = hashlib.sha256((setup.nginx.site / "big.bin").read_bytes()).hexdigest()
    exchange = setup.bridge.http.open("web", RequestHead("GET", "/big.bin"))
    exchange.end()
    started = time.perf_counter()
    head = await asyncio.wait_for(exchange.response(), WAIT)
    assert head.status == 200 and header(head, b"content-length") == str(BIG).encode()
    digest = hashlib.sha256()
    size = 0
    while chunk := await asyncio.wait_for(exchange.read(), WAIT):
        digest.update(chunk)
        size += len(chunk)
    seconds = time.perf_counter() - started
    print(f"\n32 MiB over an HTTP stream: {seconds:.2f} s, {size / MiB / seconds:.1f} MiB/s")
    assert (size, digest.hexdigest()) == (BIG, expected)


async def test_a_large_post_body_is_streamed(setup: Setup) -> None:
    body = random.Random(5).randbytes(12 * MiB + 1)
    exchange = setup.bridge.http.open("app", RequestHead("POST", "/upload"))
    for offset in range(0, len(body), 256 * 1024):
        await asyncio.wait_for(exchange.write(body[offset : offset + 256 * 1024]), WAIT)
    exchange.end()
    head = await asyncio.wait_for(exchange.response(), WAIT)
    answer = (await asyncio.wait_for(exchange.read_all(), WAIT)).decode().split()
    assert head.status == 200
    assert answer == [str(len(body)), hashlib.sha256(body).hexdigest(), "chunked"]


async def test_server_sent_events_arrive_one_by_one(setup: Setup) -> None:
    exchange = setup.bridge.http.open("app", RequestHead("GET", "/events"))
    exchange.end()
    head = await asyncio.wait_for(exchange.response(), WAIT)
    assert header(head, b"content-type") == b"text/event-stream"
    received = b""
    for seq in range(3):
        # The service writes event N+1 only once event N is here: any buffering
        # on the way (device, tunnel, client) would stall this loop.
        while f"data: event {seq}\n\n".encode() not in received:
            received += await asyncio.wait_for(exchange.read(), WAIT)
        setup.app.next_event.set()
    assert await asyncio.wait_for(exchange.read(), WAIT) == b""


async def test_redirect_range_and_bodiless_responses_pass_through(setup: Setup) -> None:
    head, _ = await fetch(setup.bridge, "web", "/found")
    assert head.status == 302 and header(head, b"location") == b"/index.html"
    head, _ = await fetch(setup.bridge, "web", "/moved")
    assert head.status == 301 and header(head, b"location") is not None
    expected = (setup.nginx.site / "big.bin").read_bytes()[100_000:100_100]
    head, body = await fetch(
        setup.bridge, "web", "/big.bin", headers=((b"range", b"bytes=100000-100099"),)
    )
    assert head.status == 206 and body == expected
    assert header(head, b"content-range") == f"bytes 100000-100099/{BIG}".encode()
    head, body = await fetch(setup.bridge, "web", "/big.bin", method="HEAD")
    assert (head.status, body) == (200, b"")
    assert header(head, b"content-length") == str(BIG).encode()
    etag = header(head, b"etag")
    assert etag is not None
    head, body = await fetch(setup.bridge, "web", "/big.bin", headers=((b"if-none-match", etag),))
    assert (head.status, body) == (304, b"")
    head, body = await fetch(setup.bridge, "web", "/no-content")
    assert (head.status, body) == (204, b"")


async def test_unknown_and_non_http_services_are_reset(setup: Setup) -> None:
    for service, code, reason in [
        ("admin", ResetCode.UNKNOWN_SERVICE, "not exposed"),
        ("ssh", ResetCode.BAD_GATEWAY, "answer"),
    ]:
        with pytest.raises(HttpStreamReset) as caught:
            await fetch(setup.bridge, service, "/")
        assert caught.value.code == code and reason in caught.value.reason, caught.value
        print(f"\n{service}: RESET {caught.value.code}: {caught.value.reason}")
    head, _ = await fetch(setup.bridge, "app", "/hello")  # the session goes on
    assert head.status == 200


async def test_a_slow_reader_keeps_memory_bounded(setup: Setup) -> None:
    [worker] = await asyncio.to_thread(setup.device.worker_pids)
    before = read_status(worker)["VmRSS"]
    exchange = setup.bridge.http.open("app", RequestHead("GET", "/endless"))
    exchange.end()
    await asyncio.wait_for(exchange.response(), WAIT)
    await stalled(setup.app, exchange)
    during = read_status(worker)["VmRSS"]
    print(
        f"\nstalled: service wrote {setup.app.written / MiB:.1f} MiB of 64, "
        f"{unread(exchange) // 1024} KiB unread in the client, "
        f"worker RSS {before / MiB:.0f} -> {during / MiB:.0f} MiB"
    )
    assert unread(exchange) <= INITIAL_WINDOW
    assert setup.app.written < 24 * MiB  # socket buffers and windows, not the body
    assert during - before < 32 * MiB
    total = 0
    while chunk := await asyncio.wait_for(exchange.read(), WAIT):
        total += len(chunk)
    assert total == setup.app.written == 64 * MiB  # all of it, once read


async def stalled(app: App, exchange: HttpExchange) -> None:
    """Wait (up to WAIT) until the service cannot write more: the reader's window
    is full and the service's writes stopped making progress."""
    last = -1
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if app.written == last and unread(exchange) >= INITIAL_WINDOW // 2:
            return
        last = app.written
        await asyncio.sleep(0.5)  # the service's progress, observed; not a synchronisation
    raise AssertionError(f"the service never stalled: {app.written} bytes written")
