"""Helpers for the stream-semantics end-to-end tests (``test_stream_semantics.py``).

The tests drive real ``tunnelctl`` processes from the ``tunnel`` fixture
(``tests/e2e/conftest.py``) and run their services and clients in the test's own
event loop. What is here:

* :func:`start_forward`: a device exposing one ``tcp://`` service and a
  ``tunnelctl connect`` to it; the blocking waits for readiness lines run in a
  thread so the loop keeps serving meanwhile.
* :class:`Forward`: that pair, with what a test inspects from outside: the
  session rows of ``tunnelctl sessions --json``, the worker's pid, open fds.
* :func:`wait_for`: a condition waited for with a deadline (for state that is
  only observable by asking, like heartbeat-refreshed session rows).
* :func:`read_to_end`: read a socket until EOF or reset, and say which.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from harness import Child
from tests.e2e.conftest import READY, Tunnel

#: Deadline for anything that must happen "promptly" (a reset, an EOF): generous,
#: so it catches hangs without flaking on a loaded machine. Tests print the
#: measured time; they do not assert it tightly.
PROMPT = 10.0
#: Deadline for the device's session rows to show a change (heartbeats every 1 s).
SESSION_ROWS = 15.0
#: Poll interval for conditions that no event announces (session rows, fd counts).
POLL = 0.1


@dataclass
class Forward:
    """A device exposing one service and a ``tunnelctl connect`` forwarding to it."""

    host: str
    port: int
    device: Child
    client: Child
    runtime_dir: str

    def sessions(self) -> list[dict[str, Any]]:
        """``tunnelctl sessions --json`` of the device's supervisor."""
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "tunnelctl",
                "sessions",
                "--json",
                "--runtime-dir",
                self.runtime_dir,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        rows = json.loads(out)
        assert isinstance(rows, list)
        return rows

    async def session(self) -> dict[str, Any]:
        """The running session's row, once there is one; there must never be two."""
        rows: list[dict[str, Any]] = []

        async def running() -> bool:
            nonlocal rows
            rows = await asyncio.to_thread(self.sessions)
            return any(r["state"] == "running" for r in rows)

        await wait_for(running, SESSION_ROWS, lambda: f"no running session: {rows}")
        running_rows = [r for r in rows if r["state"] == "running"]
        assert len(running_rows) == 1, rows
        return running_rows[0]

    async def wait_streams(self, predicate: Callable[[int], bool], what: str) -> dict[str, Any]:
        """Wait until the running session's ``streams`` satisfies ``predicate``."""
        row: dict[str, Any] = {}

        async def check() -> bool:
            nonlocal row
            row = await self.session()
            return predicate(int(row["streams"]))

        await wait_for(check, SESSION_ROWS, lambda: f"{what}; last row: {row}")
        return row

    async def worker_pid(self) -> int:
        row = await self.session()
        assert isinstance(row["worker_pid"], int), row
        return row["worker_pid"]

    def diagnose(self) -> str:
        """What a failure message should carry: the session rows and both stderr tails."""
        try:
            rows: object = self.sessions()
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            rows = f"(sessions unavailable: {exc})"
        return (
            f"sessions: {rows}; client stderr: {self.client.stderr_tail()}; "
            f"device stderr: {self.device.stderr_tail()}"
        )

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TCP connection to the forward's local port."""
        return await asyncio.wait_for(asyncio.open_connection(self.host, self.port), PROMPT)


async def start_forward(tunnel: Tunnel, service: str, port: int) -> Forward:
    """Start device ``dev1`` exposing ``service=tcp://127.0.0.1:port`` and a forward to it.

    Returns at the client's ``forwarding`` line, as a user would start using it:
    a connection made at once must work (the device may not have reported the
    session ``running`` yet; :meth:`Forward.session` waits for that).
    """

    def start() -> Forward:
        device = tunnel.start_device("dev1", expose=f"{service}=tcp://127.0.0.1:{port}")
        device.wait_line("registered ", READY)
        runtime_dir = tunnel.runtime_dirs[-1]
        client, address = tunnel.forward("dev1", service)
        host, port_text = address.rsplit(":", 1)
        return Forward(host, int(port_text), device, client, runtime_dir)

    return await asyncio.to_thread(start)


async def wait_for(
    condition: Callable[[], Awaitable[bool]], timeout: float, what: Callable[[], str]
) -> float:
    """Wait until ``condition()`` holds, for at most ``timeout`` s; return the time it took.

    For state that nothing announces (rows refreshed by heartbeats, fd tables):
    each check is a real observation, and the deadline turns a hang into a failure.
    """
    started = time.monotonic()
    deadline = started + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what()}")
        await asyncio.sleep(POLL)
    return time.monotonic() - started


def open_fds(pid: int) -> int:
    """How many file descriptors process ``pid`` has open, not counting /dev/null.

    On uvloop, libuv opens /dev/null once per loop with its first TCP handle and
    keeps it (its reserve for the EMFILE trick): that is not a leak, and it
    appears in the middle of whatever test makes the worker's first connection.
    """
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            count += os.readlink(f"/proc/{pid}/fd/{fd}") != os.devnull
    return count


def unused_port() -> socket.socket:
    """A socket bound to a loopback port but not listening: connecting to that port
    is refused, and nobody else can take the port while the socket stays open."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def abort_with_reset(writer: asyncio.StreamWriter) -> None:
    """Close abortively: SO_LINGER 0, so the kernel sends RST, not FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(frozen=True)
class Ending:
    """What reading a connection to its end produced."""

    data: bytes
    reset: bool  # ended by ECONNRESET, not a clean EOF
    seconds: float  # from the call to the end


async def read_to_end(reader: asyncio.StreamReader, timeout: float = PROMPT) -> Ending:
    """Read until EOF or a reset, within ``timeout``."""
    started = time.monotonic()
    chunks: list[bytes] = []
    reset = False

    async def drain() -> None:
        nonlocal reset
        try:
            while chunk := await reader.read(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            reset = True

    try:
        await asyncio.wait_for(drain(), timeout)
    except TimeoutError:
        got = sum(map(len, chunks))
        raise AssertionError(f"no EOF or reset within {timeout:g} s ({got} bytes read)") from None
    return Ending(b"".join(chunks), reset, time.monotonic() - started)
