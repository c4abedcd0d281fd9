"""Prometheus metrics in memory: the collectors of signaling/metrics.py and
supervisor/metrics.py fed by a real router and a real supervisor core, and the
/metrics endpoint of aio/metrics_http.py on loopback.

What is scraped is rendered and parsed back with prometheus_client's own
parser, as Prometheus would read it.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Iterable
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from aio.metrics_http import MetricsEndpoint, MetricsListenError, parse_listen_address
from protocol.ipc import Heartbeat
from protocol.signaling import Answer, Candidate, Offer, Register, SessionRequest
from signaling.auth import issue_token
from signaling.metrics import SignalingMetrics
from signaling.router import Limits, Router
from signaling.server import SignalingServer
from supervisor.config import load_config
from supervisor.errors import ConfigError
from supervisor.events import ForkServerDown, LinkChanged
from supervisor.metrics import SupervisorMetrics
from supervisor.sessions import RETAIN_EXITED
from tests.supervisor_harness import DEVICE, Stage, session_id
from tests.test_signaling_cluster import S1, two_nodes
from tests.test_signaling_router import ICE, Net
from tests.test_signaling_server import SECRET, closed, open_ws, send, token
from tunnelctl.cli import cli

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(registry: CollectorRegistry) -> Samples:
    return parse(generate_latest(registry).decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def names(samples: Iterable[tuple[str, frozenset[tuple[str, str]]]]) -> set[str]:
    return {name for name, _ in samples}


# -- HOST:PORT ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("127.0.0.1:9100", ("127.0.0.1", 9100)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:9101", ("::1", 9101)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_listen_addresses(spec: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(spec) == expected


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("127.0.0.1", "expected HOST:PORT"),
        (":9100", "expected HOST:PORT"),
        ("127.0.0.1:", "expected a port number"),
        ("127.0.0.1:http", "expected a port number"),
        ("127.0.0.1:65536", "expected a port number"),
        ("127.0.0.1:-1", "expected a port number"),
        ("::1:9100", "in brackets"),
        ("[nope]:9100", "not an IPv6 address"),
    ],
)
def test_bad_listen_addresses_say_what_is_wrong(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as info:
        parse_listen_address(spec)
    assert "\n" not in str(info.value)


# -- the endpoint ----------------------------------------------------------------------------


async def http(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    async with asyncio.timeout(10):
        response = await reader.read()  # Connection: close
    writer.close()
    return response


def endpoint_port(endpoint: MetricsEndpoint) -> int:
    return int(endpoint.url.rsplit(":", 1)[1].split("/")[0])


async def test_the_endpoint_serves_its_registry_and_nothing_else() -> None:
    metrics = SignalingMetrics(lambda: stats_of(Net()))
    endpoint = MetricsEndpoint(metrics.registry, "127.0.0.1", 0)
    await endpoint.start()
    try:
        port = endpoint_port(endpoint)
        assert endpoint.url == f"http://127.0.0.1:{port}/metrics"
        ok = await http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = ok.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Content-Type: text/plain; version=0.0.4" in head
        assert f"Content-Length: {len(body)}".encode() in head
        samples = parse(body.decode())
        assert value(samples, "tunnelctl_signal_devices_online") == 0
        assert not any(n.startswith(("python_", "process_")) for n in names(samples))
        assert (await http(port, b"GET / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404 ")
        assert (await http(port, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405 ")
        assert (await http(port, b"GET /metrics\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        assert (await http(port, b"X" * 10000)) == b""  # head too long: dropped
        head_only = await http(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert head_only.startswith(b"HTTP/1.1 200 OK") and head_only.endswith(b"\r\n\r\n")
    finally:
        await endpoint.close()


async def test_a_busy_port_is_one_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        endpoint = MetricsEndpoint(CollectorRegistry(), "127.0.0.1", port)
        with pytest.raises(MetricsListenError) as info:
            await endpoint.start()
    assert str(info.value) == (
        f"metrics: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


# -- the signaling node ------------------------------------------------------------------------


def stats_of(net: Net) -> dict[str, int]:
    return stats_of_router(net.router)


def stats_of_router(router: Router) -> dict[str, int]:
    """What SignalingServer.stats() adds to the router's: nothing of it happens here."""
    return {"tcp_connections": 0, "unauthenticated": 0, **router.stats()}


def test_signaling_metrics_follow_the_router() -> None:
    net = Net(Limits(rate=1, burst=1))
    metrics = SignalingMetrics(lambda: stats_of(net))
    net.connect("d1", "device")
    net.send("d1", Register("d1"))
    net.connect("c1", "client", ["d1", "d2"])
    net.send("c1", SessionRequest("session-0001", "d1"))
    net.send("d1", Offer("session-0001", "v=0 offer"))
    net.now += 1
    net.send("c1", Answer("session-0001", "v=0 answer"))
    net.now += 1
    net.send("c1", Candidate("session-0001", ICE))  # still one session established
    net.connect("c2", "client", ["d2"])
    net.send("c2", SessionRequest("session-0002", "d2"))  # offline
    net.send("c2", SessionRequest("session-0003", "d2"))  # over its rate: dropped
    samples = scrape(metrics.registry)

    assert value(samples, "tunnelctl_signal_connections", role="device") == 1
    assert value(samples, "tunnelctl_signal_connections", role="client") == 2
    assert value(samples, "tunnelctl_signal_connections_opened_total") == 3
    assert value(samples, "tunnelctl_signal_devices_online") == 1
    assert value(samples, "tunnelctl_signal_registrations_total") == 1
    assert value(samples, "tunnelctl_signal_sessions") == 1
    assert value(samples, "tunnelctl_signal_session_requests_total", outcome="forwarded") == 1
    assert value(samples, "tunnelctl_signal_session_requests_total", outcome="device_offline") == 1
    assert value(samples, "tunnelctl_signal_sessions_established_total") == 1
    # Forwarded: the request, the offer, the answer and the candidate.
    assert value(samples, "tunnelctl_signal_messages_relayed_total", via="local") == 4
    assert value(samples, "tunnelctl_signal_rate_limit_drops_total") == 1
    assert value(samples, "tunnelctl_signal_errors_total", code="rate_limited") == 1
    assert value(samples, "tunnelctl_signal_messages_received_total") == 7

    net.disconnect("d1")  # its session ends with peer_left to c1
    samples = scrape(metrics.registry)
    assert value(samples, "tunnelctl_signal_connections", role="device") == 0
    assert value(samples, "tunnelctl_signal_devices_online") == 0
    assert value(samples, "tunnelctl_signal_sessions") == 0


def test_no_label_is_an_identity() -> None:
    net = Net()
    metrics = SignalingMetrics(lambda: stats_of(net))
    for n in range(20):
        net.connect(f"dev-{n}", "device")
        net.send(f"dev-{n}", Register(f"dev-{n}"))
    samples = scrape(metrics.registry)
    assert not any("dev-" in v for _, labels in samples for _, v in labels)


def test_relays_to_other_nodes_are_taken_from_the_local_count() -> None:
    stats = {"tcp_connections": 0, "unauthenticated": 0, **Net().router.stats()}
    stats |= {"messages_routed": 10, "messages_to_nodes": 4, "messages_from_nodes": 3}
    samples = scrape(SignalingMetrics(lambda: stats).registry)
    assert value(samples, "tunnelctl_signal_messages_relayed_total", via="local") == 6
    assert value(samples, "tunnelctl_signal_messages_relayed_total", via="redis") == 4
    assert value(samples, "tunnelctl_signal_messages_from_nodes_total") == 3


def test_a_session_across_two_nodes_is_counted_once_and_its_relays_via_redis() -> None:
    cluster, dev, alice = two_nodes()
    cluster.send("b", alice, SessionRequest(S1, "dev1"))
    cluster.send("a", dev, Offer(S1, "v=0 offer"))
    cluster.send("b", alice, Answer(S1, "v=0 answer"))
    nodes = {
        name: scrape(SignalingMetrics(lambda r=router: stats_of_router(r)).registry)
        for name, router in cluster.routers.items()
    }
    relayed = "tunnelctl_signal_messages_relayed_total"
    assert value(nodes["b"], relayed, via="redis") == 2  # the request and the answer
    assert value(nodes["a"], relayed, via="redis") == 1  # the offer
    assert value(nodes["a"], relayed, via="local") == 2  # delivered to the device
    assert value(nodes["a"], "tunnelctl_signal_messages_from_nodes_total") == 2
    requests = "tunnelctl_signal_session_requests_total"
    assert value(nodes["b"], requests, outcome="forwarded") == 1
    assert (requests, frozenset({("outcome", "forwarded")})) not in nodes["a"]
    established = "tunnelctl_signal_sessions_established_total"
    assert (value(nodes["a"], established), value(nodes["b"], established)) == (0, 1)


# -- the supervisor ----------------------------------------------------------------------------


def metered(**tuning: object) -> tuple[Stage, SupervisorMetrics]:
    stage = Stage(**tuning)  # type: ignore[arg-type]
    metrics = SupervisorMetrics(stage.core)
    stage.boot()
    return stage, metrics


def run_session(stage: Stage, n: int, *, setup: float, sent: int, received: int) -> str:
    """Session ``n`` connected ``setup`` s after its request, having moved bytes."""
    session = session_id(n)
    stage.request(session, f"c{n}")
    stage.start_forked()
    worker = stage.worker_of(session)
    stage.advance(setup)
    stage.connected(worker, session)
    figures = (("web", received, sent, 2),)
    stage.send(worker, Heartbeat(bytes_in=received, bytes_out=sent, streams=2, services=figures))
    return worker


def test_supervisor_metrics_count_sessions_setup_times_and_bytes() -> None:
    stage, metrics = metered()
    stage.feed(LinkChanged(DEVICE, "up"))
    first = run_session(stage, 1, setup=0.3, sent=1000, received=10)
    run_session(stage, 2, setup=3.0, sent=500, received=5)
    samples = scrape(metrics.registry)
    assert value(samples, "tunnelctl_supervisor_device_up", device=DEVICE) == 1
    assert value(samples, "tunnelctl_supervisor_sessions", device=DEVICE, state="running") == 2
    assert value(samples, "tunnelctl_supervisor_sessions", device=DEVICE, state="backoff") == 0
    assert value(samples, "tunnelctl_supervisor_streams", device=DEVICE) == 4
    path = {"device": DEVICE, "path": "direct"}
    assert value(samples, "tunnelctl_supervisor_ice_path_sessions", **path) == 2
    assert value(samples, "tunnelctl_supervisor_session_setup_seconds_count", device=DEVICE) == 2
    bucket = "tunnelctl_supervisor_session_setup_seconds_bucket"
    assert value(samples, bucket, device=DEVICE, le="0.25") == 0
    assert value(samples, bucket, device=DEVICE, le="0.5") == 1
    assert value(samples, bucket, device=DEVICE, le="5.0") == 2
    assert value(samples, bucket, device=DEVICE, le="+Inf") == 2
    setup_sum = value(samples, "tunnelctl_supervisor_session_setup_seconds_sum", device=DEVICE)
    assert setup_sum == pytest.approx(3.3)
    out = {"device": DEVICE, "service": "web", "direction": "out"}
    assert value(samples, "tunnelctl_supervisor_stream_bytes_total", **out) == 1500
    web = {"device": DEVICE, "service": "web"}
    assert value(samples, "tunnelctl_supervisor_streams_opened_total", **web) == 4
    assert value(samples, "tunnelctl_supervisor_workers", state="busy") == 2
    assert value(samples, "tunnelctl_supervisor_workers", state="idle") == 2
    assert value(samples, "tunnelctl_supervisor_pool_target") == 2

    # The first session ends and leaves the table: what it counted stays.
    # A service the device does not expose is no label: a worker cannot invent them.
    figures = (("web", 10, 3000, 3), ("made-up", 1, 1, 1))
    stage.send(first, Heartbeat(bytes_in=11, bytes_out=3001, streams=0, services=figures))
    stage.ended(first, session_id(1))
    stage.exit(first, 0)
    stage.advance(RETAIN_EXITED + 2)
    assert stage.core.sessions.get(session_id(1)) is None
    samples = scrape(metrics.registry)
    assert value(samples, "tunnelctl_supervisor_stream_bytes_total", **out) == 3500
    assert value(samples, "tunnelctl_supervisor_streams_opened_total", **web) == 5
    assert not any(("service", "made-up") in labels for _, labels in samples)
    assert value(samples, "tunnelctl_supervisor_sessions_started_total", device=DEVICE) == 2
    ended = {"device": DEVICE, "state": "exited"}
    assert value(samples, "tunnelctl_supervisor_sessions_ended_total", **ended) == 1
    assert value(samples, "tunnelctl_supervisor_session_setup_seconds_count", device=DEVICE) == 2
    assert value(samples, "tunnelctl_supervisor_sessions", device=DEVICE, state="running") == 1


def test_supervisor_metrics_count_crashes_hangs_and_fork_server_restarts() -> None:
    stage, metrics = metered(heartbeat_timeout=5.0)
    crashed = run_session(stage, 1, setup=0.1, sent=1, received=1)
    stage.exit(crashed, -11)
    wedged = run_session(stage, 2, setup=0.1, sent=1, received=1)
    idle = [w for w in stage.pids if w not in (crashed, wedged)]
    for _ in range(3):
        stage.advance(1.0)
        for worker in idle:
            stage.send(worker, Heartbeat())
    assert value(scrape(metrics.registry), "tunnelctl_supervisor_heartbeat_misses_total") == 1
    for _ in range(4):  # silent for longer than heartbeat_timeout: killed
        stage.advance(1.0)
        for worker in idle:
            stage.send(worker, Heartbeat())
    stage.feed(ForkServerDown(-9))
    samples = scrape(metrics.registry)
    assert value(samples, "tunnelctl_supervisor_worker_crashes_total") == 1
    assert value(samples, "tunnelctl_supervisor_workers_hung_total") == 1
    # Missed at each tick from the third second on, until killed after the fifth.
    assert value(samples, "tunnelctl_supervisor_heartbeat_misses_total") == 4
    assert value(samples, "tunnelctl_supervisor_fork_server_restarts_total") == 1
    assert value(samples, "tunnelctl_supervisor_fork_server_up") == 0
    assert value(samples, "tunnelctl_supervisor_session_requests_total") == 2
    assert value(samples, "tunnelctl_supervisor_device_up", device=DEVICE) == 0


def test_a_crash_looping_client_shows_as_backoff_then_fatal() -> None:
    stage, metrics = metered(pool_size=1, max_restarts=1, backoff_base=1.0, backoff_cap=1.0)
    for n in range(3):
        session = session_id(n)
        stage.request(session)
        row = stage.core.sessions.get(session)
        assert row is not None
        if n == 1:
            samples = scrape(metrics.registry)
            state = {"device": DEVICE, "state": "backoff"}
            assert value(samples, "tunnelctl_supervisor_sessions", **state) == 1
        if row.start_at is not None:
            stage.advance(row.start_at - stage.now)
        if n < 2:
            stage.start_forked()
            stage.exit(stage.worker_of(session), -11, report_first=True)
    samples = scrape(metrics.registry)
    fatal = {"device": DEVICE, "state": "fatal"}
    assert value(samples, "tunnelctl_supervisor_sessions_ended_total", **fatal) == 1
    assert value(samples, "tunnelctl_supervisor_worker_crashes_total") == 2


def test_supervisor_labels_are_bounded_by_the_config() -> None:
    stage, metrics = metered()
    for n in range(5):
        run_session(stage, n, setup=0.1, sent=1, received=1)
    labels = {v for _, pairs in scrape(metrics.registry) for k, v in pairs if k == "device"}
    assert labels == {DEVICE}
    assert not any(
        "session-" in v or v.startswith("c")
        for _, pairs in scrape(metrics.registry)
        for k, v in pairs
        if k != "state"
    )


# -- configuration -----------------------------------------------------------------------------


CONFIG = """
signal = "ws://127.0.0.1:9/signal"
{metrics}
[[devices]]
id = "d1"
token = "t"
services = {{ web = "http://127.0.0.1:8080" }}
"""


def test_the_config_file_names_the_metrics_address(tmp_path: Path) -> None:
    path = tmp_path / "tunnel.toml"
    path.write_text(CONFIG.format(metrics='metrics = "[::1]:9101"'))
    assert load_config(str(path), {}).metrics == ("::1", 9101)
    path.write_text(CONFIG.format(metrics=""))
    assert load_config(str(path), {}).metrics is None  # off by default
    path.write_text(CONFIG.format(metrics='metrics = "9101"'))
    with pytest.raises(ConfigError) as info:
        load_config(str(path), {})
    assert str(info.value).startswith("metrics: expected HOST:PORT")


@pytest.mark.parametrize("verb", ["signal", "start"])
def test_a_bad_metrics_flag_is_a_usage_error(verb: str) -> None:
    result = CliRunner().invoke(cli, [verb, "--metrics", "localhost"], env={})
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--metrics': expected HOST:PORT" in result.output


def test_signal_with_its_metrics_port_taken_fails_with_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(
            cli,
            ["signal", "--port", "0", "--metrics", f"127.0.0.1:{port}"],
            env={"TUNNEL_SECRET": "s" * 64},
        )
    assert result.exit_code == 1
    assert result.output == (
        f"tunnelctl: error: metrics: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    )


# -- the README's list ----------------------------------------------------------------------


README = Path(__file__).resolve().parent.parent / "README.md"


def readme_metrics() -> tuple[dict[str, tuple[str, str]], str]:
    """The Metrics section's table rows (name -> (type, labels text)) and its alert rules."""
    text = README.read_text()
    section = text[text.index("## Metrics\n") :]
    section = section[: section.index("\n## ", 1)]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`tunnelctl_"):
            rows[cells[0].strip("`")] = (cells[1], cells[2])
    rules = section[section.index("```yaml") : section.index("```", section.index("```yaml") + 3)]
    return rows, rules


def exported() -> dict[str, tuple[str, set[str]]]:
    """Exposed name -> (type, label names) of both collectors, after some activity."""
    net = Net(Limits(rate=1, burst=1, max_drops_in_row=2))
    net.connect("d1", "device")
    net.send("d1", Register("d1"))
    net.connect("c1", "client", ["d1"])
    for n in range(4):  # the last drops close it with 4429
        net.send("c1", SessionRequest(f"session-000{n}", "d1"))
    stage, supervisor = metered()
    run_session(stage, 1, setup=0.1, sent=1, received=1)
    text = generate_latest(SignalingMetrics(lambda: stats_of(net)).registry).decode()
    text += generate_latest(supervisor.registry).decode()
    found = {}
    for family in text_string_to_metric_families(text):
        if "_process_" in family.name:
            continue
        name = f"{family.name}_total" if family.type == "counter" else family.name
        labels = {k for s in family.samples for k in s.labels if k != "le"}
        found[name] = (family.type, labels)
    return found


def test_the_readme_lists_every_metric_with_its_type_and_labels() -> None:
    rows, _ = readme_metrics()
    found = exported()
    assert set(rows) == set(found)
    for name, (kind, labels) in found.items():
        assert rows[name][0] == kind, name
        for label in labels:
            assert f"`{label}`" in rows[name][1], (name, label)


def test_the_readme_alert_rules_use_exported_metrics() -> None:
    _, rules = readme_metrics()
    used = set(re.findall(r"\btunnelctl_\w+", rules))
    assert used
    assert used <= set(exported())


# -- authentication failures on a real server ------------------------------------------------


async def test_each_failed_authentication_is_counted_by_kind(tmp_path: Path) -> None:
    revoked = tmp_path / "revoked"
    revoked.write_text("sub mallory\n")
    async with SignalingServer(SECRET, port=0, auth_timeout=0.3, revoked=revoked) as server:
        attempts = [
            ("invalid_token", f"?token={token('alice', 'client', secret='w' * 64)}", None),
            ("invalid_token", "?token=garbage", None),
            ("expired", f"?token={issue_token(SECRET, sub='a', role='client', now=0)}", None),
            ("revoked", f"?token={token('mallory', 'client')}", None),
            ("no_auth", "", Register("dev1")),
            ("timeout", "", None),
        ]
        for _, query, first in attempts:
            ws = await open_ws(server.url + query)
            if first is not None:
                await send(ws, first)
            code, _ = await closed(ws)
            assert code == 4401
        samples = scrape(server.metrics.registry)
    for kind in ("invalid_token", "expired", "revoked", "no_auth", "timeout"):
        expected = sum(1 for k, _, _ in attempts if k == kind)
        assert value(samples, "tunnelctl_signal_auth_failures_total", reason=kind) == expected
    assert value(samples, "tunnelctl_signal_connections_opened_total") == 0
