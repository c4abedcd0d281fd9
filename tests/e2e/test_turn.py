"""End to end through a real coturn: credentials from signaling, the relay path forced.

``tunnelctl signal`` hands out coturn REST credentials (``--ice-server`` +
``--turn-secret-file``); ``start`` and ``connect`` have no TURN password of
their own and run with ``--ice-policy relay``, so the only path is through
coturn. Bytes must arrive intact, the path must read ``relay`` in
``connect``'s line and in ``sessions --json``, and no credential may appear in
any log, even at ``-vv``.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from protocol.ice import turn_rest_credential
from signaling.auth import issue_token
from tests.e2e.conftest import LOOPBACK, READY, WebService
from tests.e2e.test_tunnel import http_get
from tests.e2e.turn_support import TURN_SECRET, Coturn, have_coturn, make_test_ca
from tunnelctl.children import Child

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not have_coturn(), reason="coturn (turnserver) is not installed"),
]


class LoggedChild(Child):
    """A child whose whole stderr is kept: credentials must not appear in any of it."""

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line.rstrip("\n"))


@dataclass
class RelayLab:
    secret: str
    workdir: Path
    coturn: Coturn
    web: WebService
    children: list[Child] = field(default_factory=list)
    ca: Path | None = None

    def token(self, sub: str, role: str, devices: tuple[str, ...] = ()) -> str:
        return issue_token(self.secret, sub=sub, role=role, devices=devices, ttl=600)

    def child(self, args: list[str], env: dict[str, str], name: str) -> Child:
        if self.ca is not None:
            env = {**env, "SSL_CERT_FILE": str(self.ca)}
        child = LoggedChild(args, env=env, name=name)
        self.children.append(child)
        return child

    def signal(self, *ice_servers: str) -> str:
        args = ["-vv", "signal", "--port", "0"]
        if any(url.startswith("turn") for url in ice_servers):
            args += ["--turn-secret-file", str(self.coturn.secret_file)]
        for url in ice_servers:
            args += ["--ice-server", url]
        child = self.child(args, {"TUNNEL_SECRET": self.secret}, "signal")
        return child.wait_line("listening ", READY).split()[1]

    def device(self, signal_url: str, *extra: str) -> Path:
        runtime = self.workdir / "device-runtime"
        self.child(
            [
                "-vv",
                "start",
                "--runtime-dir",
                str(runtime),
                "--signal",
                signal_url,
                "--device",
                "dev1",
                "--expose",
                f"web=http://127.0.0.1:{self.web.port}",
                *LOOPBACK,
                *extra,
            ],
            {"TUNNEL_TOKEN": self.token("dev1", "device")},
            "device",
        ).wait_line("registered ", READY)
        return runtime

    def connect(self, signal_url: str, *extra: str) -> tuple[Child, str]:
        child = self.child(
            [
                "-vv",
                "connect",
                "--signal",
                signal_url,
                "--device",
                "dev1",
                "--service",
                "web",
                *LOOPBACK,
                *extra,
            ],
            {"TUNNEL_TOKEN": self.token("client1", "client", ("dev1",))},
            "client",
        )
        return child, child.wait_line("forwarding ", READY)

    def logs(self) -> str:
        return "\n".join(line for c in self.children for line in c.stderr_lines)


@pytest.fixture
def lab() -> Iterator[RelayLab]:
    yield from _lab(tls=False)


@pytest.fixture
def tls_lab() -> Iterator[RelayLab]:
    yield from _lab(tls=True)


def _lab(*, tls: bool) -> Iterator[RelayLab]:
    workdir = Path(tempfile.mkdtemp(prefix="tunnelctl-turn-"))
    ca = None
    cert_key = None
    if tls:
        ca, cert, key = make_test_ca(workdir)
        cert_key = (cert, key)
    coturn = Coturn(workdir, tls=cert_key)
    web = WebService()
    threading.Thread(target=web.serve_forever, daemon=True).start()
    lab = RelayLab(secrets.token_hex(32), workdir, coturn, web, ca=ca)
    try:
        coturn.wait_ready(READY)
        yield lab
    finally:
        for child in reversed(lab.children):
            child.stop()
        coturn.stop()
        web.shutdown()
        web.server_close()
        shutil.rmtree(workdir, ignore_errors=True)


def sessions_json(runtime: Path) -> list[dict[str, object]]:
    out = subprocess.run(
        [sys.executable, "-m", "tunnelctl", "sessions", "--json", "--runtime-dir", str(runtime)],
        capture_output=True,
        text=True,
        timeout=READY,
        check=True,
    )
    rows = json.loads(out.stdout)
    assert isinstance(rows, list)
    return rows


def assert_no_credentials_logged(lab: RelayLab) -> None:
    """Every TURN username seen in the logs: its password must appear nowhere."""
    logs = lab.logs() + "\n".join(lab.coturn.log)
    usernames = set(re.findall(r"\b(\d{10}):(dev1|client1)\b", logs))
    assert usernames, "the -vv logs should show the TURN usernames in use"
    for expiry, peer in usernames:
        _, password = turn_rest_credential(TURN_SECRET, int(expiry), peer)
        assert password not in logs
    assert TURN_SECRET not in logs
    assert re.search(r'"credential":\s*"[^<]', logs) is None


def test_relay_only_through_coturn_with_signaled_credentials(lab: RelayLab) -> None:
    port = lab.coturn.port
    udp, tcp = f"turn:127.0.0.1:{port}", f"turn:127.0.0.1:{port}?transport=tcp"
    signal_url = lab.signal(udp, tcp)
    runtime = lab.device(signal_url, "--ice-policy", "relay")
    started = time.perf_counter()
    _, line = lab.connect(signal_url, "--ice-policy", "relay")
    print(f"relay set-up (connect start to forwarding line): {time.perf_counter() - started:.2f} s")
    assert "relay path (relay/relay over " in line, line
    address = line.split()[1]
    big = http_get(address, "/big")
    assert hashlib.sha256(big).hexdigest() == lab.web.big_sha256

    (row,) = sessions_json(runtime)
    assert (row["path"], row["pair"]) == ("relay", "relay/relay")
    assert row["relay_transport"] in ("udp", "tcp")
    logs = lab.logs()
    # Both TURN servers were gathered from, on both sides (aiortc alone keeps one).
    for url in (udp, tcp):
        assert logs.count(f"via {url}\n") + logs.count(f"via {url}") >= 2, url
    assert "session " in logs and "connected, relay path (relay/relay" in logs
    assert_no_credentials_logged(lab)


def test_explicit_turn_credentials_combine_with_the_servers(lab: RelayLab) -> None:
    """--turn/--turn-user/--turn-password still work, next to the signaled servers."""
    port = lab.coturn.port
    signal_url = lab.signal(f"stun:127.0.0.1:{port}")
    username, password = turn_rest_credential(TURN_SECRET, int(time.time()) + 600, "manual")
    explicit = [
        "--turn",
        f"turn:127.0.0.1:{port}?transport=tcp",
        "--turn-user",
        username,
        "--ice-policy",
        "relay",
    ]
    lab.device(signal_url, *explicit, "--turn-password", password)
    _, line = lab.connect(signal_url, *explicit, "--turn-password", password)
    assert "relay path (relay/relay over tcp)" in line, line
    assert http_get(line.split()[1], "/").startswith(b"<!doctype html>")
    assert password not in lab.logs()


def test_turn_over_tls_with_a_test_ca(tls_lab: RelayLab) -> None:
    assert tls_lab.coturn.tls_port is not None
    signal_url = tls_lab.signal(f"turns:127.0.0.1:{tls_lab.coturn.tls_port}")
    runtime = tls_lab.device(signal_url, "--ice-policy", "relay")
    _, line = tls_lab.connect(signal_url, "--ice-policy", "relay")
    assert "relay path (relay/relay over tls)" in line, line
    big = http_get(line.split()[1], "/big")
    assert hashlib.sha256(big).hexdigest() == tls_lab.web.big_sha256
    (row,) = sessions_json(runtime)
    assert (row["path"], row["relay_transport"]) == ("relay", "tls")
