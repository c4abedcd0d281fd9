"""End to end: three signaling nodes sharing one real ``redis-server`` (issue 13).

Every process is real and on loopback: redis-server on a free port (no
persistence), three ``tunnelctl signal --redis`` nodes, a device given all
three URLs, clients given one. Times (back online after a SIGKILL, a drain)
are printed against the bound README states, not asserted: they move with
the machine's load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from harness import Child
from signaling.auth import issue_token
from tests.e2e.conftest import LOOPBACK, READY, WebService
from tests.e2e.test_supervisor import Download

pytestmark = pytest.mark.e2e

NODES = ("a", "b", "c")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(port: int) -> Child:
    child = Child(
        [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        name="redis-server",
    )
    child.wait_line("Ready to accept connections", READY, anywhere=True)
    return child


@dataclass
class Cluster:
    secret: str
    redis_port: int
    web: WebService
    nodes: dict[str, Child] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)
    runtime: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="tunnelctl-cluster-"))

    def start_node(self, name: str, *extra: str) -> Child:
        child = Child.tunnelctl(
            [
                "signal",
                "--port",
                "0",
                "--redis",
                f"redis://127.0.0.1:{self.redis_port}/0",
                "--node-id",
                name,
                *extra,
            ],
            env={"TUNNEL_SECRET": self.secret},
            name=f"node {name}",
        )
        self.children.append(child)
        self.nodes[name] = child
        self.urls[name] = child.wait_line("listening ", READY).split()[1]
        return child

    def start_device(self, *nodes: str) -> Child:
        urls = [arg for node in nodes for arg in ("--signal", self.urls[node])]
        child = Child.tunnelctl(
            [
                "start",
                "--runtime-dir",
                self.runtime,
                *urls,
                "--device",
                "dev1",
                "--expose",
                f"web=http://127.0.0.1:{self.web.port}",
                *LOOPBACK,
            ],
            env={"TUNNEL_TOKEN": issue_token(self.secret, sub="dev1", role="device")},
            name="device",
        )
        self.children.append(child)
        child.wait_line("registered ", READY)
        return child

    def forward(self, node: str, client: str) -> str:
        """A ``tunnelctl connect`` through ``node``; its local ``HOST:PORT``."""
        token = issue_token(self.secret, sub=client, role="client", devices=("dev1",))
        child = Child.tunnelctl(
            [
                "connect",
                "--signal",
                self.urls[node],
                "--device",
                "dev1",
                "--service",
                "web",
                "--listen",
                "127.0.0.1:0",
                *LOOPBACK,
            ],
            env={"TUNNEL_TOKEN": token},
            name=f"client {client} via {node}",
        )
        self.children.append(child)
        return child.wait_line("forwarding ", READY).split()[1]

    def wait_online(self, node: str, timeout: float = READY) -> None:
        """Until ``node`` says dev1 is online (``list_devices``, as a client sees it)."""
        token = issue_token(self.secret, sub="watcher", role="client", devices=("dev1",))
        deadline = time.monotonic() + timeout
        while True:
            try:
                with ws_connect(f"{self.urls[node]}?token={token}", open_timeout=5) as ws:
                    ws.recv(timeout=5)  # welcome
                    ws.send('{"v":1,"type":"list_devices"}')
                    answer = json.loads(ws.recv(timeout=5))
                    if answer["devices"][0]["online"]:
                        return
            except (OSError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"dev1 not online as node {node} sees it in {timeout} s")
            time.sleep(0.05)  # presence is Redis pub/sub: asking again is how we observe it

    def fetch_big(self, address: str) -> None:
        download = Download(address, "/big")
        download.start()
        download.join(READY * 2)
        assert download.error is None, download.error
        assert hashlib.sha256(download.body or b"").hexdigest() == self.web.big_sha256


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (scripts/install-system-deps.sh)")
    web = WebService()
    threading.Thread(target=web.serve_forever, daemon=True).start()
    port = free_port()
    redis = start_redis(port)
    state = Cluster(secrets.token_hex(32), port, web, children=[redis])
    try:
        for name in NODES:
            state.start_node(name)
        yield state
    finally:
        for child in reversed(state.children):
            child.stop()
        shutil.rmtree(state.runtime, ignore_errors=True)
        web.shutdown()
        web.server_close()


def test_a_device_on_one_node_serves_a_client_on_another_and_survives_its_nodes_death(
    cluster: Cluster,
) -> None:
    device = cluster.start_device("a", "b", "c")
    assert "registered" in cluster.nodes["a"].wait_stderr("device dev1 registered", READY)
    cluster.wait_online("b")
    address = cluster.forward("b", "alice")  # client on b, device on a
    cluster.fetch_big(address)

    cluster.nodes["a"].kill()  # SIGKILL: no goodbye
    killed = time.monotonic()
    cluster.nodes["b"].wait_stderr("device dev1 registered", READY)  # the next URL
    registered = time.monotonic() - killed
    cluster.wait_online("c")
    online = time.monotonic() - killed
    second = cluster.forward("c", "bob")
    cluster.fetch_big(second)
    reachable = time.monotonic() - killed
    print(
        f"\nSIGKILL of the device's node: registered on b after {registered:.2f} s, "
        f"online as c sees it after {online:.2f} s, a new session through c moved "
        f"{len(cluster.web.big)} bytes {reachable:.2f} s after the kill"
    )
    cluster.fetch_big(address)  # the session made through a's peer still moves bytes
    assert device.proc.poll() is None


def test_a_sigtermed_node_drains_and_no_established_session_is_lost(cluster: Cluster) -> None:
    cluster.start_device("a", "b")
    cluster.nodes["a"].wait_stderr("device dev1 registered", READY)
    cluster.wait_online("c")
    address = cluster.forward("c", "alice")
    download = Download(address, "/paced/3")  # in flight across the drain
    download.start()
    assert download.started_body.wait(READY)

    node_a = cluster.nodes["a"]
    stopped = time.monotonic()
    code = node_a.stop(timeout=READY)
    assert code == 0, "\n".join(node_a.stderr_lines[-40:])
    drained = time.monotonic() - stopped
    assert node_a.wait_stderr("draining", READY)
    cluster.nodes["b"].wait_stderr("device dev1 registered", READY)
    print(f"\nSIGTERM of the device's node: it drained and exited in {drained:.2f} s")

    download.join(READY * 2)
    assert download.error is None, download.error
    assert hashlib.sha256(download.body or b"").hexdigest() == cluster.web.big_sha256
    cluster.wait_online("c")
    cluster.fetch_big(cluster.forward("c", "bob"))


def test_established_sessions_outlive_a_redis_restart_and_the_cluster_heals(
    cluster: Cluster,
) -> None:
    cluster.start_device("a", "b", "c")
    cluster.nodes["a"].wait_stderr("device dev1 registered", READY)
    cluster.wait_online("b")
    address = cluster.forward("b", "alice")
    download = Download(address, "/paced/3")
    download.start()
    assert download.started_body.wait(READY)

    redis = cluster.children[0]
    mark = cluster.nodes["a"].stderr_count
    redis.kill()
    cluster.nodes["a"].wait_stderr("Redis", READY, after=mark)  # a noticed
    download.join(READY * 2)  # moved while Redis was down
    assert download.error is None, download.error
    assert hashlib.sha256(download.body or b"").hexdigest() == cluster.web.big_sha256

    restarted = start_redis(cluster.redis_port)  # empty: no presence, no node keys
    cluster.children.append(restarted)
    cluster.nodes["a"].wait_stderr("announcing again", READY, after=mark)
    cluster.wait_online("c")
    cluster.fetch_big(cluster.forward("c", "bob"))
    cluster.fetch_big(address)


@contextlib.contextmanager
def raw(
    cluster: Cluster, node: str, sub: str, role: str, devices: tuple[str, ...] = ()
) -> Iterator[ClientConnection]:
    """A bare WebSocket peer on ``node``, authenticated (welcome read)."""
    token = issue_token(cluster.secret, sub=sub, role=role, devices=devices)
    with ws_connect(f"{cluster.urls[node]}?token={token}", open_timeout=READY) as ws:
        assert json.loads(ws.recv(timeout=READY))["type"] == "welcome"
        yield ws


def register(ws: ClientConnection, device: str) -> None:
    ws.send(json.dumps({"v": 1, "type": "register", "device": device}))
    assert json.loads(ws.recv(timeout=READY))["type"] == "registered"


def wait_listed(client: ClientConnection, device: str) -> None:
    """Until ``client``'s node lists ``device`` online (presence crossed Redis)."""
    deadline = time.monotonic() + READY
    while True:
        client.send('{"v":1,"type":"list_devices"}')
        listed = json.loads(client.recv(timeout=READY))["devices"]
        if any(entry["device"] == device and entry["online"] for entry in listed):
            return
        assert time.monotonic() < deadline, f"{device} never listed online"
        time.sleep(0.05)  # asking again is how presence is observed


REQUEST = '{"v":1,"type":"session_request","session":"s-0123456789ab","device":"dev9"}'


def test_a_device_registered_on_two_nodes_keeps_the_newest_link(cluster: Cluster) -> None:
    with (
        raw(cluster, "a", "dev9", "device") as older,
        raw(cluster, "b", "dev9", "device") as newer,
        raw(cluster, "c", "alice", "client", ("dev9",)) as client,
    ):
        register(older, "dev9")
        # "Newest" is the order of the registrations' gens in Redis: wait for
        # the older one's to be taken (c has heard of it) before the newer.
        wait_listed(client, "dev9")
        register(newer, "dev9")
        told = json.loads(older.recv(timeout=READY))
        assert (told["type"], told["code"]) == ("error", "replaced")
        with pytest.raises(ConnectionClosed) as closed:
            older.recv(timeout=READY)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4409
        client.send(REQUEST)  # c routes it to the newer link, on b
        request = json.loads(newer.recv(timeout=READY))
        assert (request["type"], request["client"]) == ("session_request", "alice")


def test_a_request_routed_to_a_killed_node_is_answered(cluster: Cluster) -> None:
    with (
        raw(cluster, "a", "dev9", "device") as device,
        raw(cluster, "b", "alice", "client", ("dev9",)) as client,
    ):
        register(device, "dev9")
        wait_listed(client, "dev9")
        cluster.nodes["a"].kill()  # b still believes dev9 is on a
        client.send(REQUEST)
        answer = json.loads(client.recv(timeout=READY))
        assert (answer["type"], answer["code"], answer["session"]) == (
            "error",
            "device_offline",
            "s-0123456789ab",
        )
