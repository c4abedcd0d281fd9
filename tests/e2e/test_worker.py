"""A real worker process against a test-owned ROUTER playing the supervisor."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from protocol.ipc import Heartbeat, Hello, IpcMessage, Relay, decode_ipc, encode_ipc, new_worker_id

pytestmark = pytest.mark.e2e
TIMEOUT = 20.0


class FakeSupervisor:
    def __init__(self, runtime: Path) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"ipc://{runtime}/workers.sock"
        self.sock.bind(self.endpoint)

    def recv(self, timeout: float = TIMEOUT) -> tuple[bytes, IpcMessage]:
        if not self.sock.poll(int(timeout * 1000)):
            raise TimeoutError("the worker sent nothing")
        identity, payload = self.sock.recv_multipart()
        return identity, decode_ipc(payload)

    def send(self, identity: bytes, payload: bytes) -> None:
        self.sock.send_multipart([identity, payload])

    def close(self) -> None:
        self.ctx.destroy(linger=0)


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeSupervisor]:
    supervisor = FakeSupervisor(tmp_path)
    yield supervisor
    supervisor.close()


def start_worker(
    endpoint: str, worker_id: str, heartbeat_timeout: float
) -> subprocess.Popen[bytes]:
    code = (
        "import sys; from workers.session_worker import worker_main; "
        f"sys.exit(worker_main({worker_id!r}, {endpoint!r}, {os.getpid()}, 0.2, "
        f"{heartbeat_timeout}))"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL)


def test_garbage_from_the_supervisor_side_is_survived(fake: FakeSupervisor) -> None:
    worker_id = new_worker_id()
    proc = start_worker(fake.endpoint, worker_id, heartbeat_timeout=5.0)
    try:
        identity, hello = fake.recv()
        assert hello == Hello(worker=worker_id, pid=proc.pid) and identity == worker_id.encode()
        for payload in (
            b"",
            os.urandom(64),
            b"\xc1",
            b"\x81\xa1v\x09",
            encode_ipc(Relay(session="s-not-mine-0001", message="{}")),
        ):
            fake.send(identity, payload)
        fake.send(identity, encode_ipc(Heartbeat()))
        # Still alive and talking: its next heartbeats arrive after all of that.
        deadline = time.monotonic() + TIMEOUT
        beats = 0
        while beats < 3 and time.monotonic() < deadline:
            _, message = fake.recv()
            beats += isinstance(message, Heartbeat)
            fake.send(identity, encode_ipc(Heartbeat()))
        assert beats == 3 and proc.poll() is None
    finally:
        proc.kill()
        proc.wait(TIMEOUT)


def test_a_worker_whose_supervisor_falls_silent_exits_by_itself(fake: FakeSupervisor) -> None:
    proc = start_worker(fake.endpoint, new_worker_id(), heartbeat_timeout=1.0)
    try:
        fake.recv()  # hello; from now on the "supervisor" says nothing
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
