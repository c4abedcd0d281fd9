"""End to end: sessions that come back by themselves after the device side or
signaling goes away (issue 7, "Sessions that heal themselves").

Real processes on loopback: `tunnelctl signal`, a supervisor (`tunnelctl start
--config`) and `tunnelctl connect` forwards. Each test prints the recovery time
it measured (`-s` shows it); the assertions are about what a user sees: the
forward's port keeps accepting, and requests through it work again without a
person restarting anything.
"""

from __future__ import annotations

import hashlib
import http.client
import time
from pathlib import Path

import pytest

from harness import Child
from tests.e2e.conftest import READY, Tunnel
from tests.e2e.test_supervisor import (
    Download,
    connect,
    ctl_json,
    start_supervisor,
    wait_gone,
)

pytestmark = pytest.mark.e2e


def get_until_ok(address: str, path: str, timeout: float) -> tuple[bytes, float]:
    """GET ``path`` through the forward until it answers 200; return the body and when.

    While the tunnel is being rebuilt the forward accepts and then resets a
    connection (or holds it until the session is back): each try is one event
    with its own outcome, bounded in count by the deadline.
    """
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(
            host, int(port), timeout=max(1.0, deadline - time.monotonic())
        )
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
            if response.status == 200:
                return body, time.monotonic()
            last = RuntimeError(f"HTTP {response.status}")
        except (OSError, http.client.HTTPException) as exc:
            last = exc
        finally:
            conn.close()
    raise AssertionError(f"no answer through {address} within {timeout:g} s: {last!r}")


def wait_link_up(runtime: Path, timeout: float) -> None:
    """Wait until every device of the supervisor has its signaling link up."""
    deadline = time.monotonic() + timeout
    links: list[str] = []
    while time.monotonic() < deadline:
        status = ctl_json(runtime, "status")
        assert isinstance(status, dict)
        links = [d["link"] for d in status["devices"]]
        if all(link == "up" for link in links):
            return
        time.sleep(0.1)  # the link's backoff decides when; status is the event we can observe
    raise AssertionError(f"signaling links still {links} after {timeout:g} s")


def supervisor_pids(runtime: Path) -> list[int]:
    status = ctl_json(runtime, "status")
    assert isinstance(status, dict)
    return [status["pid"], *(w["pid"] for w in status["workers"])]


@pytest.mark.parametrize("how", ["sigkill", "stop"])
def test_clients_reconnect_by_themselves_after_a_supervisor_restart(
    tunnel: Tunnel, tmp_path: Path, how: str
) -> None:
    supervisor, runtime = start_supervisor(tunnel, tmp_path, ("dev-a",))
    _, address = connect(tunnel, "dev-a", "c1")
    body, _ = get_until_ok(address, "/", READY)
    assert body.startswith(b"<!doctype html>")

    pids = supervisor_pids(runtime)
    if how == "sigkill":
        supervisor.kill()  # no goodbye: the workers notice and exit by themselves
    else:
        assert supervisor.stop(timeout=READY) == 0
    assert wait_gone(pids, READY) == []

    again = Child.tunnelctl(
        ["start", "--config", str(tmp_path / "tunnel.toml"), "--runtime-dir", str(runtime)],
        name="supervisor again",
    )
    tunnel.children.append(again)
    again.wait_line("ready ", READY)
    back_at = time.monotonic()
    body, answered_at = get_until_ok(address, "/", READY)
    assert body.startswith(b"<!doctype html>")
    print(f"\nsupervisor {how}: same forward answers {answered_at - back_at:.2f} s after restart")
    rows = ctl_json(runtime, "sessions")
    assert isinstance(rows, list)
    assert [r["client"] for r in rows if r["state"] == "running"] == ["c1"]


def test_thirty_seconds_without_signaling(tunnel: Tunnel, tmp_path: Path) -> None:
    """Established sessions keep transferring; new sessions work soon after it returns."""
    _, runtime = start_supervisor(tunnel, tmp_path, ("dev-a",))
    _, address = connect(tunnel, "dev-a", "c1")
    signal_child = tunnel.children[0]
    port = tunnel.signal_url.rsplit(":", 1)[1].split("/")[0]
    signal_child.stop()  # SIGTERM: a deliberate stop, as for an upgrade
    # The outage lasts as long as this paced transfer: about 30 s of bytes
    # flowing on the established session while nobody can signal.
    outage_started = time.monotonic()
    during = Download(address, "/paced/30")
    during.start()
    during.join(READY * 3)
    assert during.error is None
    assert hashlib.sha256(during.body or b"").hexdigest() == tunnel.web.big_sha256
    outage = time.monotonic() - outage_started

    restarted = Child.tunnelctl(
        ["signal", "--port", port], env={"TUNNEL_SECRET": tunnel.secret}, name="signal again"
    )
    tunnel.children.append(restarted)
    restarted.wait_line("listening ", READY)
    back_at = time.monotonic()
    wait_link_up(runtime, READY)
    registered_at = time.monotonic()
    # A new client: its session needs the device registered again.
    _, address2 = connect(tunnel, "dev-a", "c2")
    body, answered_at = get_until_ok(address2, "/", READY)
    assert body.startswith(b"<!doctype html>")
    print(
        f"\nsignaling down {outage:.1f} s: the established session moved 16 MiB meanwhile; "
        f"the device re-registered {registered_at - back_at:.2f} s after the server returned, "
        f"a new client's first answer came {answered_at - back_at:.2f} s after it"
    )
