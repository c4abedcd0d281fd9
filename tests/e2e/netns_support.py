"""A private network namespace for the healing tests, and an HTTP probe to run in it.

:class:`Netns` makes ``tc-heal-<pid>-<n>`` with only ``lo`` up; every process
of a test runs inside it (``ip netns exec``), so the iptables rules a test adds
there (drop all UDP between the peers, 5 % random loss) touch nothing else on
the machine, and signaling (TCP) keeps working. The namespace is deleted, with
its rules, when the test ends; processes are stopped by pid before that.

Run as a module inside the namespace, this file is the test's HTTP client::

    python -m tests.e2e.netns_support get HOST:PORT PATH [--timeout S]

It prints ``started`` once the first body bytes arrive, then one JSON line:
``{"outcome": "complete"|"reset"|"eof"|"timeout"|"refused", "bytes": N,
"sha256": HEX, "seconds": S}``. ``eof`` is an end before Content-Length (a
truncation that would pass for a complete transfer), ``reset`` an ECONNRESET.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from harness import Child

_counter = itertools.count()


def netns_unavailable() -> str | None:
    """Why namespaces cannot be used here, or ``None``."""
    if os.geteuid() != 0:
        return "needs root: creates a network namespace and iptables rules inside it"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install iproute2 iptables)"
    return None


@dataclass
class Netns:
    """One network namespace that this test run owns."""

    name: str = field(default_factory=lambda: f"tc-heal-{os.getpid()}-{next(_counter)}")
    children: list[Child] = field(default_factory=list)
    created: bool = False

    def create(self) -> None:
        subprocess.run(["ip", "netns", "add", self.name], check=True, timeout=30)
        self.created = True
        self.run("ip", "link", "set", "lo", "up")

    def delete(self) -> None:
        for child in reversed(self.children):
            child.stop()
        if self.created:
            subprocess.run(["ip", "netns", "del", self.name], check=False, timeout=30)
            self.created = False

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def run(self, *argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.prefix, *argv], capture_output=True, text=True, timeout=timeout, check=True
        )

    def iptables(self, *rule: str) -> None:
        """``iptables`` inside this namespace only (``-w``: wait for the xtables lock)."""
        self.run("iptables", "-w", "10", *rule)

    def child(self, args: Sequence[str], *, env: dict[str, str], name: str) -> Child:
        child = Child.tunnelctl(args, env=env, name=name, prefix=self.prefix)
        self.children.append(child)
        return child

    def web_service(self) -> tuple[subprocess.Popen[str], int]:
        """The e2e web service (``/``, ``/big``, ``/paced/S``) inside; returns it and its port."""
        code = (
            "from tests.e2e.conftest import WebService\n"
            "web = WebService()\n"
            "print(web.port, flush=True)\n"
            "web.serve_forever()\n"
        )
        proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        assert proc.stdout is not None
        return proc, int(proc.stdout.readline())

    def get(self, address: str, path: str, timeout: float = 120.0) -> Probe:
        """Start the HTTP probe inside the namespace (see the module docstring)."""
        return Probe(self, address, path, timeout)


class Probe:
    """One HTTP GET run by this module's ``get`` inside the namespace."""

    def __init__(self, netns: Netns, address: str, path: str, timeout: float) -> None:
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [
                *netns.prefix,
                sys.executable,
                "-m",
                "tests.e2e.netns_support",
                "get",
                address,
                path,
                "--timeout",
                str(timeout),
            ],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self.timeout = timeout

    def wait_started(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line == "started", f"probe said {line!r} instead of 'started'"

    def result(self) -> dict[str, object]:
        try:
            out, _ = self.proc.communicate(timeout=self.timeout + 30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        assert lines, f"probe printed no result: {out!r}"
        result: dict[str, object] = json.loads(lines[-1])
        return result


def _get(address: str, path: str, timeout: float) -> dict[str, object]:
    host, _, port = address.rpartition(":")
    started = time.monotonic()
    digest = hashlib.sha256()
    count = 0
    length: int | None = None
    outcome = "eof"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode()
            )
            head = b""
            while b"\r\n\r\n" not in head:
                data = sock.recv(65536)
                if not data:
                    raise EOFError
                head += data
            head, _, body = head.partition(b"\r\n\r\n")
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            print("started", flush=True)
            while True:
                digest.update(body)
                count += len(body)
                if length is not None and count >= length:
                    outcome = "complete"
                    break
                body = sock.recv(262144)
                if not body:
                    break
    except ConnectionResetError:
        outcome = "reset"
    except ConnectionRefusedError:
        outcome = "refused"
    except TimeoutError:
        outcome = "timeout"
    except EOFError:
        outcome = "eof"
    return {
        "outcome": outcome,
        "bytes": count,
        "sha256": digest.hexdigest(),
        "seconds": round(time.monotonic() - started, 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.netns_support")
    sub = parser.add_subparsers(dest="verb", required=True)
    get = sub.add_parser("get")
    get.add_argument("address")
    get.add_argument("path")
    get.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    with contextlib.suppress(BrokenPipeError):
        print(json.dumps(_get(args.address, args.path, args.timeout)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
