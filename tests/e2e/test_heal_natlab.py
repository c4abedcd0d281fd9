"""Sessions that heal themselves across real NATs (issue 7), in the NAT lab.

``scripts/natlab.py`` builds the public segment (``tunnelctl signal``, coturn)
and the sites; each test adds its own sites and runs real ``tunnelctl start``
and ``connect`` in them. Recovery and connect times are printed (``-s``), not
asserted: what is asserted is what a user sees (the same forward port answers
again, the bytes are intact, the path is the one the NATs allow).
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from tests.e2e.natlab_support import natlab, natlab_lab

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

__all__ = ["natlab_lab"]  # a fixture: imported for pytest, not unused

HEAL_DEADLINE = 60.0  # far beyond the goal (3 s after the path returns): a failure, not slowness
IDLE = 120.0  # "a device idle for minutes": four times the lab's 30 s UDP mapping timeout


def fetch_until_ok(lab: Any, site: Any, address: str, path: str = "/big") -> dict[str, Any]:
    """GET through the forward until it answers 200; each try is one bounded event.

    While the session is being rebuilt the forward holds a new connection for
    up to the keepalive and then resets it: that try fails and the next begins.
    """
    deadline = time.monotonic() + HEAL_DEADLINE
    while True:
        try:
            result: dict[str, Any] = lab.fetch(site, address, path)
        except natlab.LabError as exc:
            result = {"status": None, "error": str(exc)[-300:]}
        if result["status"] == 200:
            return result
        assert time.monotonic() < deadline, f"no answer through {address}: {result}"


def session_path(device: Any) -> str | None:
    running = [r for r in device.sessions() if r["state"] == "running"]
    return str(running[-1]["path"]) if running else None


def open_ms(forwarding_line: str) -> float:
    match = re.search(r"open in (\d+) ms", forwarding_line)
    assert match, forwarding_line
    return float(match[1])


def test_the_client_recovers_on_its_new_address_after_a_wi_fi_change(natlab_lab: Any) -> None:
    lab = natlab_lab
    device_site, client_site = lab.add_site("hm-dev", "cone"), lab.add_site("hm-cli", "cone")
    lab.start_web(device_site)
    device = lab.start_device(device_site, "heal-move")
    client = lab.start_client(client_site, "heal-move")
    address = client.wait_line("forwarding ").split()[1]
    first = lab.fetch(client_site, address)
    assert first["sha256"] == lab.big_sha256

    lab.renumber(client_site)
    moved = time.monotonic()
    fetch_until_ok(lab, client_site, address, "/")
    took = time.monotonic() - moved
    print(f"\naddress change: the same forward answered again {took:.2f} s later")
    assert lab.fetch(client_site, address)["sha256"] == lab.big_sha256
    assert session_path(device) == "direct"


def test_a_blocked_direct_path_falls_back_to_the_relay_by_itself(natlab_lab: Any) -> None:
    lab = natlab_lab
    device_site, client_site = lab.add_site("hr-dev", "cone"), lab.add_site("hr-cli", "cone")
    lab.start_web(device_site)
    device = lab.start_device(device_site, "heal-relay")
    client = lab.start_client(client_site, "heal-relay")
    address = client.wait_line("forwarding ").split()[1]
    assert lab.fetch(client_site, address)["sha256"] == lab.big_sha256
    assert session_path(device) == "direct"

    lab.partition(client_site, device_site)  # the sites cannot reach each other; TURN still can
    blocked = time.monotonic()
    fetch_until_ok(lab, client_site, address, "/")
    print(f"\ndirect path blocked: back on the relay {time.monotonic() - blocked:.2f} s later")
    assert lab.fetch(client_site, address)["sha256"] == lab.big_sha256
    assert session_path(device) == "relay"
    client_site.uplink.restore()


@pytest.mark.timeout(IDLE + 240)
def test_devices_idle_for_two_minutes_behind_each_nat_are_reachable_at_once(
    natlab_lab: Any,
) -> None:
    """Behind each NAT kind, and relay-only (the device's own TURN allocation is its
    only way in: an allocation made when the worker was forked would be stale)."""
    lab = natlab_lab
    cases = {
        "cone": (),
        "symmetric": (),
        "udp-blocked": (),
        "symmetric-relay": ("--ice-policy", "relay"),
        "cone-relay": ("--ice-policy", "relay"),
    }
    devices = {}
    for case, extra in cases.items():
        site = lab.add_site(f"hi-{case}", case.removesuffix("-relay"))
        lab.start_web(site)
        devices[case] = lab.start_device(site, f"heal-idle-{case}", extra=extra)
    time.sleep(IDLE)  # the idle time is the experiment: every NAT mapping made at start expired
    client_site = lab.add_site("hi-cli", "cone")
    for case in cases:
        client = lab.start_client(client_site, f"heal-idle-{case}")
        line = client.wait_line("forwarding ")
        result = lab.fetch(client_site, line.split()[1])
        path = session_path(devices[case])
        print(f"\nidle {IDLE:g} s behind {case}: open in {open_ms(line):.0f} ms, {path} path")
        assert result["sha256"] == lab.big_sha256
        assert path == ("direct" if case == "cone" else "relay")
        lab.stop(client)
