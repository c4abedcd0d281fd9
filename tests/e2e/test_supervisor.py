"""End to end: the supervisor with worker processes, as real processes on loopback.

`tunnelctl start --config` hosts two devices; clients are `tunnelctl connect`
processes; ops verbs are run as a script would run them.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

from harness import Child
from tests.e2e.conftest import LOOPBACK, READY, Tunnel

pytestmark = pytest.mark.e2e

TUNING = """
[supervisor]
pool_size = 2
heartbeat_interval = 0.5
heartbeat_timeout = 2.0
drain_timeout = 10.0
"""


def write_config(tunnel: Tunnel, path: Path, devices: tuple[str, ...]) -> Path:
    lines = [f'signal = "{tunnel.signal_url}"', 'ice_hosts = ["127.0.0.1"]', TUNING]
    for device in devices:
        lines += [
            "[[devices]]",
            f'id = "{device}"',
            f'token = "{tunnel.token(device, "device")}"',
            "[devices.services]",
            f'web = "http://127.0.0.1:{tunnel.web.port}"',
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def ctl(runtime: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tunnelctl", *args, "--runtime-dir", str(runtime)],
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


def ctl_json(runtime: Path, verb: str) -> object:
    return json.loads(ctl(runtime, verb, "--json").stdout)


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait (on pidfds, no polling) until the processes exit; return those still alive."""
    fds = {}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # already gone
            fds[os.pidfd_open(pid)] = pid
    deadline = time.monotonic() + timeout
    try:
        while fds and (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(list(fds), [], [], left)
            for fd in ready:
                os.close(fd)
                del fds[fd]
    finally:
        alive = list(fds.values())
        for fd in fds:
            os.close(fd)
    return alive


def start_supervisor(
    tunnel: Tunnel, tmp_path: Path, devices: tuple[str, ...]
) -> tuple[Child, Path]:
    runtime = tmp_path / "run"
    config = write_config(tunnel, tmp_path / "tunnel.toml", devices)
    child = Child.tunnelctl(
        ["start", "--config", str(config), "--runtime-dir", str(runtime)], name="supervisor"
    )
    tunnel.children.append(child)
    child.wait_line("ready ", READY)
    return child, runtime


def connect(tunnel: Tunnel, device: str, client: str) -> tuple[Child, str]:
    token = tunnel.token(client, "client", (device,))
    child = Child.tunnelctl(
        [
            "connect",
            "--signal",
            tunnel.signal_url,
            "--device",
            device,
            "--service",
            "web",
            "--listen",
            "127.0.0.1:0",
            *LOOPBACK,
        ],
        env={"TUNNEL_TOKEN": token},
        name=f"client {client}",
    )
    tunnel.children.append(child)
    return child, child.wait_line("forwarding ", READY).split()[1]


class Download(threading.Thread):
    """GET a path through a forward in the background; keep the body or the error."""

    def __init__(self, address: str, path: str) -> None:
        super().__init__(daemon=True)
        self.address, self.path = address, path
        self.body: bytes | None = None
        self.error: BaseException | None = None
        self.started_body = threading.Event()

    def run(self) -> None:
        host, port = self.address.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            conn.request("GET", self.path)
            response = conn.getresponse()
            chunks = [response.read(65536)]
            self.started_body.set()
            while chunk := response.read(65536):
                chunks.append(chunk)
            self.body = b"".join(chunks)
            if response.length:  # http.client leaves it > 0 on a short read
                raise http.client.IncompleteRead(self.body, response.length)
        except BaseException as exc:
            self.error = exc
        finally:
            self.started_body.set()
            conn.close()


def session_of(runtime: Path, client: str, state: str = "running") -> dict[str, object]:
    rows = ctl_json(runtime, "sessions")
    assert isinstance(rows, list)
    matching = [r for r in rows if r["client"] == client and r["state"] == state]
    assert matching, rows
    return matching[-1]


def test_a_crashed_worker_takes_down_only_its_session(tunnel: Tunnel, tmp_path: Path) -> None:
    _, runtime = start_supervisor(tunnel, tmp_path, ("dev-a", "dev-b"))
    forwards = {
        c: connect(tunnel, d, c)[1] for c, d in (("c1", "dev-a"), ("c2", "dev-a"), ("c3", "dev-b"))
    }
    downloads = {c: Download(address, "/paced/4") for c, address in forwards.items()}
    for d in downloads.values():
        d.start()
    for d in downloads.values():
        assert d.started_body.wait(READY)
    victim = session_of(runtime, "c1")
    os.kill(int(victim["worker_pid"]), signal.SIGKILL)  # type: ignore[call-overload]
    for d in downloads.values():
        d.join(READY * 2)
    assert downloads["c1"].error is not None  # its transfer failed...
    for client in ("c2", "c3"):  # ...and the others never noticed
        assert downloads[client].error is None, downloads[client].error
        assert hashlib.sha256(downloads[client].body or b"").hexdigest() == tunnel.web.big_sha256
    # c1's forward re-establishes its session by itself; the next request succeeds.
    again = Download(forwards["c1"], "/big")
    again.start()
    again.join(READY * 2)
    assert (
        again.error is None
        and hashlib.sha256(again.body or b"").hexdigest() == tunnel.web.big_sha256
    )
    rows = ctl_json(runtime, "sessions")
    assert isinstance(rows, list)
    old = next(r for r in rows if r["id"] == victim["id"])
    assert old["state"] == "exited" and "crashed" in str(old["reason"])
    assert session_of(runtime, "c1")["restarts"] == 1
    assert all(r["restarts"] == 0 for r in rows if r["client"] != "c1")
    status = ctl_json(runtime, "status")
    assert isinstance(status, dict)
    assert status["counters"]["worker_crashes"] == 1
    assert [d["link"] for d in status["devices"]] == ["up", "up"]


def test_a_hung_worker_is_detected_killed_and_its_client_recovers(
    tunnel: Tunnel, tmp_path: Path
) -> None:
    _, runtime = start_supervisor(tunnel, tmp_path, ("dev-a",))
    _, address = connect(tunnel, "dev-a", "c1")
    first = Download(address, "/")
    first.start()
    first.join(READY)
    assert first.error is None
    pid = int(session_of(runtime, "c1")["worker_pid"])  # type: ignore[call-overload]
    os.kill(pid, signal.SIGSTOP)  # a wedged event loop: alive, but silent
    try:
        assert wait_gone([pid], timeout=READY) == []  # heartbeat timeout is 2 s
    finally:
        # wait_gone(..., 0) reports a process as alive without looking: the kill
        # may find it already reaped.
        if wait_gone([pid], 0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    rows = ctl_json(runtime, "sessions")
    assert isinstance(rows, list)
    assert any("hung" in str(r["reason"]) for r in rows), rows
    again = Download(address, "/")
    again.start()
    again.join(READY * 2)
    assert again.error is None


def test_stop_drains_an_in_flight_transfer(tunnel: Tunnel, tmp_path: Path) -> None:
    supervisor, runtime = start_supervisor(tunnel, tmp_path, ("dev-a",))
    _, address = connect(tunnel, "dev-a", "c1")
    download = Download(address, "/paced/3")
    download.start()
    assert download.started_body.wait(READY)
    stopped = ctl(runtime, "stop", "--drain-timeout", "30")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    download.join(READY)
    assert download.error is None, download.error
    assert hashlib.sha256(download.body or b"").hexdigest() == tunnel.web.big_sha256
    assert supervisor.wait(READY) == 0
    assert ctl(runtime, "status", check=False).returncode == 3


def test_sigkill_of_the_supervisor_leaves_no_worker_behind(tunnel: Tunnel, tmp_path: Path) -> None:
    supervisor, runtime = start_supervisor(tunnel, tmp_path, ("dev-a",))
    connect(tunnel, "dev-a", "c1")
    status = ctl_json(runtime, "status")
    assert isinstance(status, dict)
    pids = [w["pid"] for w in status["workers"]] + [status["fork_server_pid"]]
    assert len(pids) >= 3  # the session's worker, the idle pool, the fork server
    supervisor.kill()
    assert wait_gone(pids, timeout=10) == []


def test_garbage_on_both_sockets_leaves_everything_running(tunnel: Tunnel, tmp_path: Path) -> None:
    _, runtime = start_supervisor(tunnel, tmp_path, ("dev-a",))
    _, address = connect(tunnel, "dev-a", "c1")
    status = ctl_json(runtime, "status")
    assert isinstance(status, dict)
    real_worker = status["workers"][0]["id"]
    ctx = zmq.Context()
    try:
        garbage = [
            b"",
            b"\x00" * 10,
            os.urandom(300),
            b"\x81\xa1v\x02",
            b"\x93\x01\x02\x03",
            b"\x83\xa1v\x01\xa1t\xa5relay\xa1b\x82\xa7session\xa8s-nobody\xa7message\xa1x",
        ]
        workers = ctx.socket(zmq.DEALER)
        workers.setsockopt(zmq.LINGER, 1000)
        workers.setsockopt(zmq.IDENTITY, b"w-0000000000000000")  # a worker nobody spawned
        workers.connect(f"ipc://{runtime}/workers.sock")
        for payload in garbage:
            workers.send(payload)
        workers.send_multipart([b"two", b"frames"])
        impostor = ctx.socket(zmq.DEALER)  # claims a real worker's identity: refused by ROUTER
        impostor.setsockopt(zmq.LINGER, 1000)
        impostor.setsockopt(zmq.IDENTITY, real_worker.encode())
        impostor.connect(f"ipc://{runtime}/workers.sock")
        impostor.send(garbage[-1])
        control = ctx.socket(zmq.DEALER)
        control.setsockopt(zmq.LINGER, 1000)
        control.connect(f"ipc://{runtime}/control.sock")
        for payload in garbage:
            control.send_multipart([b"", payload])
        control.send(b"no delimiter")
        replies = 0
        poller = zmq.Poller()
        poller.register(control, zmq.POLLIN)
        deadline = time.monotonic() + READY
        while replies < len(garbage) and time.monotonic() < deadline:
            if poller.poll(1000):
                frames = control.recv_multipart()
                assert frames[0] == b""
                replies += 1
        assert replies == len(garbage)  # each got an error reply, not silence or a crash
    finally:
        ctx.destroy(linger=0)
    after = ctl_json(runtime, "status")
    assert isinstance(after, dict)
    assert after["counters"]["bad_control_messages"] >= len(garbage)
    assert after["counters"]["bad_worker_messages"] >= 1
    ok = Download(address, "/")
    ok.start()
    ok.join(READY)
    assert ok.error is None


def test_ops_verbs_without_a_supervisor_exit_3_with_one_line(tmp_path: Path) -> None:
    runtime = tmp_path / "nothing-here"
    for verb in (("status",), ("sessions", "--json"), ("stop",), ("kill", "s-0123456789ab")):
        result = ctl(runtime, *verb, check=False)
        assert result.returncode == 3, (verb, result.stderr)
        assert result.stderr.startswith("tunnelctl: error: no supervisor running")


def test_established_sessions_outlive_the_signaling_server(tunnel: Tunnel, tmp_path: Path) -> None:
    _, runtime = start_supervisor(tunnel, tmp_path, ("dev-a",))
    _, address = connect(tunnel, "dev-a", "c1")
    signal_child = tunnel.children[0]
    port = tunnel.signal_url.rsplit(":", 1)[1].split("/")[0]
    signal_child.kill()  # SIGKILL: no goodbye to anyone
    during = Download(address, "/big")
    during.start()
    during.join(READY * 2)
    assert during.error is None
    assert hashlib.sha256(during.body or b"").hexdigest() == tunnel.web.big_sha256
    # The signaling server comes back on the same port; the device re-registers by itself.
    restarted = Child.tunnelctl(
        ["signal", "--port", port], env={"TUNNEL_SECRET": tunnel.secret}, name="signal"
    )
    tunnel.children.append(restarted)
    restarted.wait_line("listening ", READY)
    deadline = time.monotonic() + READY
    link = None
    while time.monotonic() < deadline:
        status = ctl_json(runtime, "status")
        assert isinstance(status, dict)
        link = status["devices"][0]["link"]
        if link == "up":
            break
        time.sleep(0.2)  # the link's backoff decides when; status is the event we can observe
    assert link == "up"
    _, address2 = connect(tunnel, "dev-a", "c2")
    fresh = Download(address2, "/")
    fresh.start()
    fresh.join(READY)
    assert fresh.error is None


def test_detach_status_and_stop(tunnel: Tunnel, tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    config = write_config(tunnel, tmp_path / "tunnel.toml", ("dev-a",))
    started = ctl(runtime, "start", "--config", str(config), "--detach")
    assert started.stdout.startswith("started pid=")
    pid = int(started.stdout.split()[1].removeprefix("pid="))
    try:
        status = ctl_json(runtime, "status")
        assert isinstance(status, dict) and status["pid"] == pid and status["ready"] is True
        assert status["devices"][0]["link"] == "up"
        assert status["pool"]["target"] == 2
        again = ctl(runtime, "start", "--config", str(config), check=False)
        assert again.returncode == 1 and "already runs" in again.stderr
        # Issue 9: --detach next to a running supervisor read the old one's
        # "ready" as its own child's and said "started".
        detached = ctl(runtime, "start", "--config", str(config), "--detach", check=False)
        assert (detached.returncode, detached.stdout) == (1, "")
        (line,) = detached.stderr.splitlines()
        assert line.startswith("tunnelctl: error: the supervisor did not start: ") and (
            f"a supervisor (pid {pid}) already runs" in line
        ), line
        assert ctl_json(runtime, "status")["pid"] == pid  # type: ignore[index]
        assert ctl(runtime, "stop").returncode == 0
        assert wait_gone([pid], READY) == []
    finally:
        if wait_gone([pid], 0):
            os.kill(pid, signal.SIGKILL)
