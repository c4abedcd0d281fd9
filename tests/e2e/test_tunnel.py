"""End to end: tunnelctl signal + start + connect as real processes on loopback."""

from __future__ import annotations

import hashlib
import http.client
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.conftest import PAGE, READY, Tunnel

pytestmark = pytest.mark.e2e


def http_get(address: str, path: str, timeout: float = 60.0) -> bytes:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200
        return response.read()
    finally:
        conn.close()


def test_page_and_16_mib_file_are_byte_identical(device_tunnel: Tunnel) -> None:
    _, address = device_tunnel.forward()
    assert http_get(address, "/") == PAGE
    big = http_get(address, "/big")
    assert len(big) == len(device_tunnel.web.big)
    assert hashlib.sha256(big).hexdigest() == device_tunnel.web.big_sha256


def test_twenty_concurrent_requests_all_succeed(device_tunnel: Tunnel) -> None:
    _, address = device_tunnel.forward()
    paths = [f"/echo/{i}" for i in range(20)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        bodies = list(pool.map(lambda p: http_get(address, p), paths))
    assert bodies == [p.encode() for p in paths]


def test_wrong_token_is_refused_with_a_clear_error(device_tunnel: Tunnel) -> None:
    forged = Tunnel.token(device_tunnel, "client1", "client", ("dev1",))
    header, payload, signature = forged.split(".")
    bad = f"{header}.{payload}.{signature[:-4]}AAAA"
    child = device_tunnel.start_client(token=bad)
    assert child.wait(timeout=READY) == 1
    assert any(
        "tunnelctl: error:" in line and "signature" in line for line in child.stderr_lines
    ), child.stderr_lines


def test_unknown_device_is_reported_offline(device_tunnel: Tunnel) -> None:
    token = device_tunnel.token("client1", "client", ("nosuch",))
    child = device_tunnel.start_client("nosuch", token=token)
    assert child.wait(timeout=READY) == 1
    assert any(
        line.startswith("tunnelctl: error: device nosuch is offline") for line in child.stderr_lines
    ), child.stderr_lines


def test_device_not_granted_by_the_token_is_forbidden(device_tunnel: Tunnel) -> None:
    token = device_tunnel.token("client1", "client", ("other",))
    child = device_tunnel.start_client("dev1", token=token)
    assert child.wait(timeout=READY) == 1
    assert any("tunnelctl: error:" in line and "dev1" in line for line in child.stderr_lines), (
        child.stderr_lines
    )


def test_unexposed_service_fails_before_any_session_is_requested(device_tunnel: Tunnel) -> None:
    device = device_tunnel.children[1]
    child = device_tunnel.start_client(service="admin")
    assert child.wait(timeout=READY) == 1
    assert (
        "tunnelctl: error: device dev1 does not expose service 'admin' (it exposes: web)"
        in child.stderr_lines
    )
    # The device logs every session request it gets: after a good forward's, that is the only one.
    _, address = device_tunnel.forward()
    assert http_get(address, "/") == PAGE
    device.wait_stderr("asks for dev1", READY)
    assert sum("asks for dev1" in line for line in device.stderr_lines) == 1, device.stderr_lines


def test_killing_a_client_mid_transfer_leaves_the_device_serving(device_tunnel: Tunnel) -> None:
    first, address = device_tunnel.forward()
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=READY) as sock:
        sock.settimeout(READY)
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        received = 0
        while received < 1024 * 1024:  # the transfer is well under way
            chunk = sock.recv(65536)
            assert chunk
            received += len(chunk)
        first.kill()
    _, address = device_tunnel.forward()
    assert http_get(address, "/") == PAGE
    assert hashlib.sha256(http_get(address, "/big")).hexdigest() == device_tunnel.web.big_sha256
    device = device_tunnel.children[1]
    assert device.proc.poll() is None


def test_help_on_every_verb() -> None:
    for verb in ("signal", "token", "start", "connect", "devices", "demo"):
        out = subprocess.run(
            [sys.executable, "-m", "tunnelctl", verb, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert f"Usage: tunnelctl {verb}" in out
