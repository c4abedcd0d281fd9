"""End to end through a real coturn: credentials from signaling, the relay path forced.

``tunnelctl signal`` hands out coturn REST credentials (``--ice-server`` +
``--turn-secret-file``); ``start`` and ``connect`` have no TURN password of
their own and run with ``--ice-policy relay``, so the only path is through
coturn. Bytes must arrive intact, the path must read ``relay`` in
``connect``'s line and in ``sessions --json``, and no credential may appear in
any log, even at ``-vv``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness import Child
from protocol.ice import turn_rest_credential
from signaling.auth import issue_token
from tests.e2e.conftest import LOOPBACK, READY, WebService
from tests.e2e.test_supervisor import ctl_json
from tests.e2e.test_tunnel import http_get
from tests.e2e.turn_support import TURN_SECRET, Coturn, free_port, have_coturn, make_test_ca

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not have_coturn(), reason="coturn (turnserver) is not installed"),
]


class LoggedChild(Child):
    """A child whose whole stderr is kept: credentials must not appear in any of it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.logged = threading.Condition()
        super().__init__(*args, **kwargs)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self.logged:
                self.stderr_lines.append(line.rstrip("\n"))
                self.logged.notify_all()

    def wait_logged(self, fragment: str, count: int, timeout: float) -> None:
        """Wait until ``fragment`` has appeared in ``count`` stderr lines."""
        with self.logged:
            if not self.logged.wait_for(
                lambda: sum(fragment in line for line in self.stderr_lines) >= count, timeout
            ):
                relevant = [
                    line
                    for line in self.stderr_lines
                    if "TURN" in line or "worker w-" in line or "ICE server" in line
                ]
                raise AssertionError(
                    f"{self.name}: {fragment!r} not logged {count} times; "
                    + " | ".join(relevant[-15:])
                )


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

    def child(self, args: list[str], env: dict[str, str], name: str) -> LoggedChild:
        if self.ca is not None:
            env = {**env, "SSL_CERT_FILE": str(self.ca)}
        child = LoggedChild.tunnelctl(args, env=env, name=name)
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
        return self.start_device(signal_url, *extra)[1]

    def start_device(self, signal_url: str, *extra: str) -> tuple[LoggedChild, Path]:
        runtime = self.workdir / "device-runtime"
        child = self.child(
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
        )
        child.wait_line("registered ", READY)
        return child, runtime

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
        line = child.wait_line("forwarding ", READY)
        print(line)  # the set-up time and the path, for the record
        return child, line

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
        lab.coturn.stop()  # a test may have replaced it (restarted coturn)
        web.shutdown()
        web.server_close()
        shutil.rmtree(workdir, ignore_errors=True)


def sessions_json(runtime: Path) -> list[dict[str, object]]:
    rows = ctl_json(runtime, "sessions")
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
    device, runtime = lab.start_device(signal_url, "--ice-policy", "relay")
    started = time.perf_counter()
    _, line = lab.connect(signal_url, "--ice-policy", "relay")
    print(f"relay set-up (connect start to forwarding line): {time.perf_counter() - started:.2f} s")
    assert "relay path (relay/relay over " in line, line
    address = line.split()[1]
    fetch_started = time.perf_counter()
    big = http_get(address, "/big")
    seconds = time.perf_counter() - fetch_started
    print(f"16 MiB through coturn in {seconds:.2f} s ({len(big) / seconds / 2**20:.1f} MiB/s)")
    assert hashlib.sha256(big).hexdigest() == lab.web.big_sha256

    (row,) = sessions_json(runtime)
    assert (row["path"], row["pair"]) == ("relay", "relay/relay")
    assert row["relay_transport"] in ("udp", "tcp")
    logs = lab.logs()
    # Both TURN servers were gathered from, on both sides (aiortc alone keeps one).
    for url in (udp, tcp):
        assert logs.count(f"via {url}\n") + logs.count(f"via {url}") >= 2, url
    assert "session " in logs and "connected, relay path (relay/relay" in logs
    # The servers arrived after the pool was forked: idle workers prepared again
    # in the background, so the session did not gather on its own path.
    assert "preparing on the session path" not in logs
    # -vv: the workers' aiortc/aioice debug lines reach the supervisor's log.
    worker_lines = [line for line in device.stderr_lines if " worker[" in line]
    assert any(" aioice." in line and " DEBUG " in line for line in worker_lines)
    assert any(" aiortc." in line and " DEBUG " in line for line in worker_lines)
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


def test_an_idle_device_replaces_a_turn_allocation_the_server_dropped(lab: RelayLab) -> None:
    """coturn restarts while the device is idle: its workers notice and gather again."""
    url = f"turn:127.0.0.1:{lab.coturn.port}?transport=tcp"
    signal_url = lab.signal(url)
    device, _ = lab.start_device(signal_url, "--ice-policy", "relay", "--pool-size", "1")
    device.wait_logged(f"via {url}", 1, READY)  # the idle worker holds an allocation

    lab.coturn.stop()
    lost = time.perf_counter()
    device.wait_logged(f"TURN allocation on {url} lost", 1, READY)
    print(f"allocation loss noticed in {time.perf_counter() - lost:.2f} s")
    lab.coturn = Coturn(lab.workdir, port=lab.coturn.port)
    lab.coturn.wait_ready(READY)
    back = time.perf_counter()
    # Retries back off up to 15 s: under load coturn's start can outlast a few.
    device.wait_logged("offer prepared again with a fresh relay", 1, 2 * READY)
    print(f"relay re-gathered {time.perf_counter() - back:.2f} s after coturn's return")

    _, line = lab.connect(signal_url, "--ice-policy", "relay")
    assert "relay path (relay/relay over tcp)" in line, line
    assert http_get(line.split()[1], "/").startswith(b"<!doctype html>")


async def test_every_stun_and_turn_server_is_gathered_and_failures_are_logged(
    lab: RelayLab, caplog: pytest.LogCaptureFixture
) -> None:
    """aiortc alone keeps the first STUN and the first TURN server; we keep them all."""
    from protocol.ice import IceServer
    from workers.peer import PeerSession

    async def send(message: object) -> None:
        pass

    port = lab.coturn.port
    username, password = turn_rest_credential(TURN_SECRET, int(time.time()) + 600, "inproc")
    dead = free_port()  # nothing listens there: that server must fail visibly
    servers = [
        IceServer(f"stun:127.0.0.1:{dead}"),
        IceServer(f"stun:127.0.0.1:{port}"),
        IceServer(f"turn:127.0.0.1:{dead}", username, password),
        IceServer(f"turn:127.0.0.1:{port}", username, password),
        IceServer(f"turn:127.0.0.1:{port}?transport=tcp", username, password),
    ]
    peer = PeerSession("", send, ice_servers=servers)
    try:
        with caplog.at_level(logging.WARNING, logger="tunnelctl.ice"):
            sdp = await asyncio.wait_for(peer.prepare_offer(), READY)
        lines = [line for line in sdp.splitlines() if line.startswith("a=candidate:")]
        relays = [line for line in lines if " typ relay " in line]
        srflx = [line for line in lines if " typ srflx " in line]
        assert len(relays) == 2, lines  # TURN over UDP and over TCP, side by side
        assert len({line.split()[0] for line in relays}) == 2  # distinct foundations
        assert len(srflx) == 1, lines  # from the second STUN server
        relay_priority = {
            protocol.tunnelctl_relay_transport: protocol.local_candidate.priority
            for protocol in peer._ice_connection()._protocols
            if hasattr(protocol, "tunnelctl_relay_transport")
        }
        assert relay_priority["udp"] > relay_priority["tcp"], relay_priority  # UDP first
        failed = peer.failed_turn_servers()
        assert failed == [f"TURN server turn:127.0.0.1:{dead}"]
        assert f"STUN server stun:127.0.0.1:{dead}" in caplog.text
        assert f"TURN server turn:127.0.0.1:{dead}" in caplog.text
    finally:
        await peer.close()


def test_a_path_through_the_peers_relay_reads_relay(lab: RelayLab) -> None:
    """The device has only host candidates; the client only its relay: both say relay."""
    signal_url = lab.signal()
    runtime = lab.device(signal_url)
    username, password = turn_rest_credential(TURN_SECRET, int(time.time()) + 600, "client1")
    _, line = lab.connect(
        signal_url,
        "--turn",
        f"turn:127.0.0.1:{lab.coturn.port}",
        "--turn-user",
        username,
        "--turn-password",
        password,
        "--ice-policy",
        "relay",
    )
    assert "relay path (relay/host over udp)" in line, line
    assert http_get(line.split()[1], "/").startswith(b"<!doctype html>")
    (row,) = sessions_json(runtime)
    # The device's own candidate is a host candidate: only the pair shows the relay.
    assert (row["path"], row["pair"], row["relay_transport"]) == ("relay", "host/relay", None)
