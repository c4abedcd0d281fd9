"""``tunnelctl demo``: the whole path on loopback, in real processes.

Starts a signaling server, a sample web service, a device exposing it and a
client forward (each a ``tunnelctl`` child process, as a user would run them),
with a freshly generated secret and tokens passed through the environment.
Then it fetches a page and a few MiB through the tunnel, checks the bytes,
and prints the time to DataChannel open and the throughput.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import random
import re
import secrets
import threading
import time
import urllib.request

import click

from harness import Child, ChildFailed
from signaling.auth import issue_token

READY_TIMEOUT = 30.0
PAGE = b"""<!doctype html>
<html><head><title>tunnelctl demo</title></head>
<body><h1>Hello through the tunnel</h1>
<p>This page was served on the device side and reached you over a WebRTC DataChannel.</p>
<p><a href="/blob">/blob</a> is a block of random bytes for the throughput check.</p>
</body></html>
"""


def make_blob(size: int) -> bytes:
    return random.Random(2026).randbytes(size)


class SampleService(http.server.ThreadingHTTPServer):
    """A small web service on 127.0.0.1 (``/`` is a page, ``/blob`` random bytes)."""

    daemon_threads = True

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: SampleService
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = self.server.blob if self.path == "/blob" else PAGE
        ctype = "application/octet-stream" if self.path == "/blob" else "text/html; charset=utf-8"
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return bytes(response.read())


def run_demo(*, once: bool, size_mib: int) -> int:
    secret = secrets.token_hex(32)
    blob = make_blob(size_mib * 1024 * 1024)
    service = SampleService(blob)
    threading.Thread(target=service.serve_forever, daemon=True).start()
    service_port = service.server_address[1]
    children: list[Child] = []
    common = ["--ice-host", "127.0.0.1"]
    try:
        signal_child = Child.tunnelctl(
            ["signal", "--port", "0"], env={"TUNNEL_SECRET": secret}, name="signal"
        )
        children.append(signal_child)
        signal_url = signal_child.wait_line("listening ", READY_TIMEOUT).split()[1]
        click.echo(f"signaling server   {signal_url}")
        click.echo(f"sample web service http://127.0.0.1:{service_port}/")

        device_token = issue_token(secret, sub="demo-device", role="device", ttl=86400)
        device = Child.tunnelctl(
            [
                "start",
                "--signal",
                signal_url,
                "--device",
                "demo-device",
                "--expose",
                f"web=http://127.0.0.1:{service_port}",
                *common,
            ],
            env={"TUNNEL_TOKEN": device_token},
            name="device",
        )
        children.append(device)
        device.wait_line("registered ", READY_TIMEOUT)
        click.echo("device             demo-device exposes web")

        client_token = issue_token(
            secret, sub="demo-client", role="client", devices=["demo-device"], ttl=86400
        )
        client = Child.tunnelctl(
            [
                "connect",
                "--signal",
                signal_url,
                "--device",
                "demo-device",
                "--service",
                "web",
                "--listen",
                "127.0.0.1:0",
                *common,
            ],
            env={"TUNNEL_TOKEN": client_token},
            name="connect",
        )
        children.append(client)
        line = client.wait_line("forwarding ", READY_TIMEOUT)
        local = line.split()[1]
        opened = re.search(r"open in (\d+) ms", line)
        url = f"http://{local}/"

        page = fetch(url)
        if page != PAGE:
            click.echo(
                "tunnelctl: error: the page through the tunnel differs from the original", err=True
            )
            return 1
        started = time.perf_counter()
        got = fetch(url + "blob")
        elapsed = time.perf_counter() - started
        if hashlib.sha256(got).digest() != hashlib.sha256(blob).digest():
            click.echo(
                "tunnelctl: error: the blob through the tunnel differs from the original", err=True
            )
            return 1
        click.echo(f"time to DataChannel open  {opened.group(1) if opened else '?'} ms")
        click.echo(f"page                      {len(page)} bytes, identical")
        click.echo(
            f"throughput                {size_mib} MiB in {elapsed:.2f} s = "
            f"{size_mib / elapsed:.1f} MiB/s, bytes identical"
        )
        click.echo(f"\nOpen {url} while this runs (Ctrl-C to stop).")
        if once:
            return 0
        with contextlib.suppress(KeyboardInterrupt):
            while all(c.proc.poll() is None for c in children):
                time.sleep(0.5)
            for child in children:
                if child.proc.poll() is not None:
                    click.echo(
                        f"tunnelctl: error: {child.name} exited: {child.stderr_tail()}", err=True
                    )
                    return 1
        return 0
    except ChildFailed as exc:
        click.echo(f"tunnelctl: error: {exc}", err=True)
        return 1
    finally:
        for child in reversed(children):
            child.stop()
        service.shutdown()
