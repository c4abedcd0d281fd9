"""End to end: /metrics of a real `tunnelctl signal --metrics` and `tunnelctl start
--metrics` (flag and TOML key), scraped over HTTP and parsed with
prometheus_client's parser, against what the test did: sessions opened, bytes
moved, a worker killed and its session restarted, a worker wedged and killed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from harness import Child
from tests.e2e.conftest import BIG_SIZE, READY, Tunnel, WebService
from tests.e2e.test_cluster import Cluster, cluster  # noqa: F401  (its fixture, reused)
from tests.e2e.test_supervisor import (
    Download,
    connect,
    ctl_json,
    session_of,
    wait_gone,
    write_config,
)

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def scrape_until(url: str, ready: Callable[[Samples], bool], what: str) -> Samples:
    """Scrape until ``ready`` holds: the figures are the events we can observe
    (a worker reports its counters with each heartbeat)."""
    deadline = time.monotonic() + READY
    while True:
        samples = scrape(url)
        if ready(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {READY} s")
        time.sleep(0.1)


class Metered:
    """A tunnel whose signaling server serves metrics."""

    def __init__(self, tunnel: Tunnel, metrics_url: str) -> None:
        self.tunnel = tunnel
        self.metrics_url = metrics_url


@pytest.fixture
def metered() -> Iterator[Metered]:
    secret = secrets.token_hex(32)
    web = WebService()
    threading.Thread(target=web.serve_forever, daemon=True).start()
    children: list[Child] = []
    runtime_dirs: list[str] = []
    try:
        child = Child.tunnelctl(
            ["signal", "--port", "0", "--metrics", "127.0.0.1:0"],
            env={"TUNNEL_SECRET": secret},
            name="signal",
        )
        children.append(child)
        listening, metrics = child.wait_lines(["listening ", "metrics "], READY)
        tunnel = Tunnel(secret, listening.split()[1], web, children, runtime_dirs)
        yield Metered(tunnel, metrics.split()[1])
    finally:
        for child in reversed(children):
            child.stop()
        for runtime in runtime_dirs:
            shutil.rmtree(runtime, ignore_errors=True)
        web.shutdown()
        web.server_close()


def start_supervisor(tunnel: Tunnel, config: Path, *flags: str) -> tuple[Child, Path, str]:
    runtime = Path(tempfile.mkdtemp(prefix="tunnelctl-metrics-"))
    tunnel.runtime_dirs.append(str(runtime))
    child = Child.tunnelctl(
        ["start", "--config", str(config), "--runtime-dir", str(runtime / "run"), *flags],
        name="supervisor",
    )
    tunnel.children.append(child)
    metrics, _ = child.wait_lines(["metrics ", "ready "], READY)
    return child, runtime / "run", metrics.split()[1]


def fetch(address: str, path: str) -> bytes:
    download = Download(address, path)
    download.start()
    download.join(READY * 2)
    assert download.error is None, download.error
    return download.body or b""


def response_size(port: int, path: str) -> int:
    """Bytes of the web service's response to GET ``path``, headers included,
    asked directly (its headers have the same length whoever asks)."""
    with socket.create_connection(("127.0.0.1", port), timeout=READY) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            assert chunk
            head += chunk
    headers = head[: head.index(b"\r\n\r\n") + 4]
    length = next(
        int(line.split(b":", 1)[1])
        for line in headers.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return len(headers) + length


def request_size(address: str, path: str) -> int:
    """Bytes of http.client's GET ``path`` through the forward at ``address`` (Download's)."""
    return len(f"GET {path} HTTP/1.1\r\nHost: {address}\r\nAccept-Encoding: identity\r\n\r\n")


def test_metrics_match_sessions_opened_and_bytes_moved(metered: Metered, tmp_path: Path) -> None:
    tunnel = metered.tunnel
    config = write_config(tunnel, tmp_path / "tunnel.toml", ("dev-a",))
    config.write_text('metrics = "127.0.0.1:0"\n' + config.read_text())
    _, runtime, supervisor_url = start_supervisor(tunnel, config)

    # One failed login, with a token that is not one.
    bad_login = f"{tunnel.signal_url}?token=not-a-jwt"
    with pytest.raises(ConnectionClosed) as closed, ws_connect(bad_login) as ws:
        ws.recv(timeout=READY)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401

    _, first = connect(tunnel, "dev-a", "c1")
    _, second = connect(tunnel, "dev-a", "c2")
    big = fetch(first, "/big")
    assert hashlib.sha256(big).hexdigest() == tunnel.web.big_sha256
    page = fetch(second, "/")

    device = {"device": "dev-a"}
    out = {"device": "dev-a", "service": "web", "direction": "out"}
    into = {"device": "dev-a", "service": "web", "direction": "in"}
    # Every byte of both responses and both requests, once the workers' next
    # heartbeats have reported them.
    sent = response_size(tunnel.web.port, "/big") + response_size(tunnel.web.port, "/")
    received = request_size(first, "/big") + request_size(second, "/")
    assert sent > BIG_SIZE + len(page)
    sup = scrape_until(
        supervisor_url,
        lambda s: (
            value(s, "tunnelctl_supervisor_stream_bytes_total", **out) == sent
            and value(s, "tunnelctl_supervisor_stream_bytes_total", **into) == received
        ),
        "every byte reported by the workers",
    )
    # The same figures as `tunnelctl sessions`, summed.
    rows = ctl_json(runtime, "sessions")
    assert isinstance(rows, list) and len(rows) == 2
    assert sum(r["bytes_out"] for r in rows) == sent
    assert sum(r["bytes_in"] for r in rows) == received
    web = {"device": "dev-a", "service": "web"}
    assert value(sup, "tunnelctl_supervisor_streams_opened_total", **web) == 2
    assert value(sup, "tunnelctl_supervisor_device_up", **device) == 1
    assert value(sup, "tunnelctl_supervisor_sessions", state="running", **device) == 2
    assert value(sup, "tunnelctl_supervisor_sessions_started_total", **device) == 2
    assert value(sup, "tunnelctl_supervisor_session_setup_seconds_count", **device) == 2
    assert value(sup, "tunnelctl_supervisor_session_requests_total") == 2
    paths = {"device": "dev-a", "path": "direct"}
    assert value(sup, "tunnelctl_supervisor_ice_path_sessions", **paths) == 2  # loopback
    assert value(sup, "tunnelctl_supervisor_worker_crashes_total") == 0
    assert value(sup, "tunnelctl_supervisor_fork_server_up") == 1
    assert value(sup, "tunnelctl_supervisor_pool_target") == 2
    print(
        "set-up times: sum",
        value(sup, "tunnelctl_supervisor_session_setup_seconds_sum", **device),
        "s over 2 sessions",
    )

    sig = scrape(metered.metrics_url)
    assert value(sig, "tunnelctl_signal_connections", role="device") == 1
    assert value(sig, "tunnelctl_signal_connections", role="client") == 2
    assert value(sig, "tunnelctl_signal_devices_online") == 1
    assert value(sig, "tunnelctl_signal_registrations_total") == 1
    assert value(sig, "tunnelctl_signal_session_requests_total", outcome="forwarded") == 2
    assert value(sig, "tunnelctl_signal_sessions_established_total") == 2
    assert value(sig, "tunnelctl_signal_sessions") == 2
    assert value(sig, "tunnelctl_signal_auth_failures_total", reason="invalid_token") == 1
    assert value(sig, "tunnelctl_signal_auth_failures_total", reason="expired") == 0
    # Each session: request, offer, answer and candidates, all on this node.
    assert value(sig, "tunnelctl_signal_messages_relayed_total", via="local") >= 6
    assert value(sig, "tunnelctl_signal_rate_limit_drops_total") == 0
    assert value(sig, "tunnelctl_signal_process_resident_memory_bytes") > 0


def test_a_killed_worker_and_a_hung_one_are_counted(metered: Metered, tmp_path: Path) -> None:
    tunnel = metered.tunnel
    config = write_config(tunnel, tmp_path / "tunnel.toml", ("dev-a",))
    _, runtime, url = start_supervisor(tunnel, config, "--metrics", "127.0.0.1:0")
    _, address = connect(tunnel, "dev-a", "c1")
    fetch(address, "/")
    victim = int(session_of(runtime, "c1")["worker_pid"])  # type: ignore[call-overload]
    os.kill(victim, signal.SIGKILL)
    device = {"device": "dev-a"}
    # The forward asks again by itself: the restart is a second session, running.
    sup = scrape_until(
        url,
        lambda s: (
            value(s, "tunnelctl_supervisor_sessions", state="running", **device) == 1
            and value(s, "tunnelctl_supervisor_sessions_started_total", **device) == 2
        ),
        "the restarted session",
    )
    fetch(address, "/")
    assert value(sup, "tunnelctl_supervisor_worker_crashes_total") == 1
    assert value(sup, "tunnelctl_supervisor_sessions_ended_total", state="exited", **device) == 1
    assert value(sup, "tunnelctl_supervisor_workers_hung_total") == 0
    assert session_of(runtime, "c1")["restarts"] == 1

    wedged = int(session_of(runtime, "c1")["worker_pid"])  # type: ignore[call-overload]
    os.kill(wedged, signal.SIGSTOP)  # alive but silent: heartbeat_timeout is 2 s
    try:
        assert wait_gone([wedged], timeout=READY) == []
    finally:
        if wait_gone([wedged], 0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(wedged, signal.SIGKILL)
    # Killed for it, and its session judged a crash once its exit is seen.
    sup = scrape_until(
        url,
        lambda s: (
            value(s, "tunnelctl_supervisor_workers_hung_total") == 1
            and value(s, "tunnelctl_supervisor_worker_crashes_total") == 2
        ),
        "the hung worker",
    )
    assert value(sup, "tunnelctl_supervisor_sessions_ended_total", state="exited", **device) == 2
    assert value(sup, "tunnelctl_supervisor_heartbeat_misses_total") >= 1  # before the kill

    sig = scrape(metered.metrics_url)
    assert value(sig, "tunnelctl_signal_session_requests_total", outcome="forwarded") >= 2


def test_start_with_its_metrics_port_taken_fails_with_one_line(
    metered: Metered, tmp_path: Path
) -> None:
    tunnel = metered.tunnel
    config = write_config(tunnel, tmp_path / "tunnel.toml", ("dev-a",))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        child = Child.tunnelctl(
            [
                "start",
                "--config",
                str(config),
                "--runtime-dir",
                str(tmp_path / "run"),
                "--metrics",
                f"127.0.0.1:{port}",
            ],
            name="supervisor",
        )
        tunnel.children.append(child)
        assert child.wait(READY) == 1
    assert child.stderr_lines == [
        f"tunnelctl: error: metrics: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


def test_a_node_counts_what_it_relays_through_redis(cluster: Cluster) -> None:  # noqa: F811
    """A client on node m (with --metrics) reaches the device on node a: what m
    routes goes through Redis, and m counts the request and its outcome."""
    cluster.start_device("a")
    node = cluster.start_node("m", "--metrics", "127.0.0.1:0")
    url = node.wait_line("metrics ", READY).split()[1]
    cluster.wait_online("m")
    cluster.fetch_big(cluster.forward("m", "alice"))
    samples = scrape(url)
    assert value(samples, "tunnelctl_signal_devices_online") == 0
    assert value(samples, "tunnelctl_signal_cluster_remote_devices") == 1
    assert value(samples, "tunnelctl_signal_session_requests_total", outcome="forwarded") == 1
    assert value(samples, "tunnelctl_signal_sessions_established_total") == 1
    relayed = "tunnelctl_signal_messages_relayed_total"
    assert value(samples, relayed, via="redis") >= 2  # the request and the answer at least
    assert value(samples, relayed, via="local") >= 1  # the offer, to alice
    assert value(samples, "tunnelctl_signal_messages_from_nodes_total") >= 1
    assert value(samples, "tunnelctl_signal_connections", role="client") == 1
