"""Fixtures that start real ``tunnelctl`` processes on loopback.

Every process is started with ``harness.Child`` and stopped by pid in the
fixture's teardown; readiness is the process's own stdout line, waited for
with a deadline.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import random
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from harness import Child
from signaling.auth import issue_token

READY = 30.0
LOOPBACK = ["--ice-host", "127.0.0.1"]
BIG_SIZE = 16 * 1024 * 1024 + 12345  # >= 16 MiB and not a multiple of any frame size
PAGE = b"<!doctype html><title>e2e</title><p>hello from the device side</p>\n"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: WebService
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.startswith("/paced/"):
            self._paced()
            return
        if self.path == "/big":
            body = self.server.big
        elif self.path.startswith("/echo/"):
            body = self.path.encode()
        else:
            body = PAGE
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _paced(self) -> None:
        """``/paced/SECONDS``: the /big body spread over about SECONDS, so a
        transfer is reliably still running while a test acts on it."""
        seconds = float(self.path.split("/")[2])
        body = self.server.big
        chunk = 256 * 1024
        pause = seconds / (len(body) / chunk)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):
            for offset in range(0, len(body), chunk):
                self.wfile.write(body[offset : offset + chunk])
                time.sleep(pause)  # pacing the sender, not waiting for an event

    def log_message(self, format: str, *args: object) -> None:
        pass


class WebService(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        self.big = random.Random(7).randbytes(BIG_SIZE)
        self.big_sha256 = hashlib.sha256(self.big).hexdigest()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


@dataclass
class Tunnel:
    secret: str
    signal_url: str
    web: WebService
    children: list[Child]
    runtime_dirs: list[str] = field(default_factory=list)

    def token(self, sub: str, role: str, devices: tuple[str, ...] = (), ttl: int = 600) -> str:
        return issue_token(self.secret, sub=sub, role=role, devices=devices, ttl=ttl)

    def start_device(self, device: str = "dev1", *, expose: str | None = None) -> Child:
        expose = expose or f"web=http://127.0.0.1:{self.web.port}"
        runtime = tempfile.mkdtemp(prefix=f"tunnelctl-{device}-")
        self.runtime_dirs.append(runtime)
        child = Child.tunnelctl(
            [
                "start",
                "--runtime-dir",
                runtime,
                "--signal",
                self.signal_url,
                "--device",
                device,
                "--expose",
                expose,
                *LOOPBACK,
            ],
            env={"TUNNEL_TOKEN": self.token(device, "device")},
            name=f"device {device}",
        )
        self.children.append(child)
        return child

    def start_client(
        self, device: str = "dev1", service: str = "web", *, token: str | None = None
    ) -> Child:
        token = token or self.token("client1", "client", (device,))
        child = Child.tunnelctl(
            [
                "connect",
                "--signal",
                self.signal_url,
                "--device",
                device,
                "--service",
                service,
                "--listen",
                "127.0.0.1:0",
                *LOOPBACK,
            ],
            env={"TUNNEL_TOKEN": token},
            name=f"client {device}/{service}",
        )
        self.children.append(child)
        return child

    def forward(self, device: str = "dev1", service: str = "web") -> tuple[Child, str]:
        """Start a client and return it with its local ``HOST:PORT``."""
        child = self.start_client(device, service)
        line = child.wait_line("forwarding ", READY)
        return child, line.split()[1]


@pytest.fixture
def tunnel() -> Iterator[Tunnel]:
    secret = secrets.token_hex(32)
    web = WebService()
    threading.Thread(target=web.serve_forever, daemon=True).start()
    children: list[Child] = []
    runtime_dirs: list[str] = []
    try:
        signal_child = Child.tunnelctl(
            ["signal", "--port", "0"], env={"TUNNEL_SECRET": secret}, name="signal"
        )
        children.append(signal_child)
        url = signal_child.wait_line("listening ", READY).split()[1]
        yield Tunnel(secret, url, web, children, runtime_dirs)
    finally:
        for child in reversed(children):
            child.stop()
        for runtime in runtime_dirs:
            shutil.rmtree(runtime, ignore_errors=True)
        web.shutdown()
        web.server_close()


@pytest.fixture
def device_tunnel(tunnel: Tunnel) -> Tunnel:
    """A tunnel with device ``dev1`` exposing ``web`` registered."""
    tunnel.start_device().wait_line("registered ", READY)
    return tunnel
