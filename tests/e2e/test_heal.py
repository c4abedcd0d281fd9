"""End to end: sessions that heal themselves (issue 7), in a network namespace.

Signaling, the web service, ``tunnelctl start`` and ``tunnelctl connect`` run
inside a namespace the test creates, on its loopback; iptables rules inside it
break the peers' path (all UDP) while signaling (TCP) keeps working. The times
measured (detection, recovery, throughput) are printed, not asserted: they
move with the machine's load. Needs root; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from harness import Child
from signaling.auth import issue_token
from tests.e2e.conftest import BIG_SIZE, LOOPBACK, READY
from tests.e2e.netns_support import Netns, netns_unavailable

pytestmark = pytest.mark.e2e

KEEPALIVE = 5.0  # the default, stated so the printed bounds can be read against it
DROP_UDP = ("-p", "udp", "-j", "DROP")
LOSS_5 = ("-p", "udp", "-m", "statistic", "--mode", "random", "--probability", "0.05", "-j", "DROP")


@dataclass
class Lab:
    netns: Netns
    secret: str
    signal_url: str
    web_port: int
    big_sha256: str
    runtime: str

    def device(self, *extra: str, env: dict[str, str] | None = None) -> Child:
        child = self.netns.child(
            [
                "start",
                "--runtime-dir",
                self.runtime,
                "--signal",
                self.signal_url,
                "--device",
                "dev1",
                "--expose",
                f"web=http://127.0.0.1:{self.web_port}",
                *LOOPBACK,
                *extra,
            ],
            env={
                "TUNNEL_TOKEN": issue_token(self.secret, sub="dev1", role="device"),
                **(env or {}),
            },
            name="device",
        )
        child.wait_line("registered ", READY)
        return child

    def client(self, *extra: str, env: dict[str, str] | None = None) -> tuple[Child, str]:
        token = issue_token(self.secret, sub="c1", role="client", devices=("dev1",))
        child = self.netns.child(
            [
                "connect",
                "--signal",
                self.signal_url,
                "--device",
                "dev1",
                "--service",
                "web",
                *LOOPBACK,
                *extra,
            ],
            env={"TUNNEL_TOKEN": token, **(env or {})},
            name="client",
        )
        return child, child.wait_line("forwarding ", READY).split()[1]

    def sessions(self) -> list[dict[str, object]]:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "tunnelctl",
                "sessions",
                "--json",
                "--runtime-dir",
                self.runtime,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        rows: list[dict[str, object]] = json.loads(out)
        return rows


@pytest.fixture
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    netns = Netns()
    web: subprocess.Popen[str] | None = None
    try:
        netns.create()
        web, web_port = netns.web_service()
        secret = secrets.token_hex(32)
        signal = netns.child(
            ["signal", "--port", "0"], env={"TUNNEL_SECRET": secret}, name="signal"
        )
        url = signal.wait_line("listening ", READY).split()[1]
        import hashlib
        import random

        big = hashlib.sha256(random.Random(7).randbytes(BIG_SIZE)).hexdigest()
        runtime = str(tmp_path_factory.mktemp("heal-runtime"))
        yield Lab(netns, secret, url, web_port, big, runtime)
    finally:
        netns.delete()  # children first, by pid
        if web is not None:
            web.kill()
            web.wait(timeout=10)


def test_a_dead_path_is_noticed_by_both_ends_and_the_client_heals(lab: Lab) -> None:
    device = lab.device()
    client, address = lab.client()
    first = lab.netns.get(address, "/").result()
    assert first["outcome"] == "complete", first
    running = lab.netns.get(address, "/paced/60")
    running.wait_started()
    old = next(r for r in lab.sessions() if r["state"] == "running")

    device_mark, client_mark = device.stderr_count, client.stderr_count
    lab.netns.iptables("-I", "INPUT", *DROP_UDP)
    broken = time.monotonic()
    client.wait_stderr("path lost", READY, after=client_mark)
    client_noticed = time.monotonic() - broken
    device.wait_stderr("path lost", READY, after=device_mark)
    device_noticed = time.monotonic() - broken
    print(
        f"\ndead path noticed after {client_noticed:.2f} s (client) and "
        f"{device_noticed:.2f} s (device); keepalive {KEEPALIVE:g} s"
    )
    # The transfer that was running is reset, never cut short as if complete.
    interrupted = running.result()
    assert interrupted["outcome"] == "reset", interrupted
    # The old session is reported as lost on the device.
    row = next(r for r in lab.sessions() if r["id"] == old["id"])
    assert row["state"] == "exited" and "path lost" in str(row["reason"]), row
    # A request made while the path is down fails with a reset, not a hang.
    during = lab.netns.get(address, "/").result()
    assert during["outcome"] == "reset", during
    print(f"a request during the outage was reset after {during['seconds']} s")

    client_mark = client.stderr_count
    lab.netns.iptables("-D", "INPUT", *DROP_UDP)
    back = time.monotonic()
    client.wait_stderr("re-established", READY, after=client_mark)
    print(
        f"client re-established its session {time.monotonic() - back:.2f} s after the path returned"
    )
    again = lab.netns.get(address, "/big").result()
    assert again["outcome"] == "complete" and again["sha256"] == lab.big_sha256, again


def test_16_mib_arrive_intact_through_5_percent_random_loss(lab: Lab) -> None:
    lab.device()
    _, address = lab.client()
    lab.netns.iptables("-I", "INPUT", *LOSS_5)
    result = lab.netns.get(address, "/big", timeout=300).result()
    assert result["outcome"] == "complete" and result["sha256"] == lab.big_sha256, result
    seconds = float(str(result["seconds"]))
    print(
        f"\n16 MiB through 5 % UDP loss: {BIG_SIZE / seconds / 2**20:.2f} MiB/s ({seconds:.1f} s)"
    )


def test_a_tuned_device_and_a_stock_aiortc_client_connect_and_transfer(lab: Lab) -> None:
    lab.device()
    _, address = lab.client(env={"TUNNELCTL_STOCK_AIORTC": "1"})
    result = lab.netns.get(address, "/big").result()
    assert result["outcome"] == "complete" and result["sha256"] == lab.big_sha256, result
