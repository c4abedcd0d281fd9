"""tunnelctl across real NATs: the NAT lab's matrix as tests (issue 7), and the lab's blocks.

For every (device NAT, client NAT) pair of ``scripts/natlab.py``: a real
``tunnelctl signal`` and coturn on the public segment, ``tunnelctl start`` and
``connect`` in namespaces behind iptables NAT routers. Each case must connect,
take the path the NATs allow (RFC 4787 behaviours: direct unless a symmetric
mapping meets a filtering peer or UDP is blocked), carry TURN over TCP where
UDP is blocked, and deliver 16 MiB intact. The path is checked twice: by the
candidate types the two ends report, and by the routers' byte counters of
traffic with the TURN server (a direct transfer does not cross it, a relayed
one does). Connect times and throughput are printed (``-s``), not asserted.

One lab serves the whole module; its device restarts only when the device NAT
changes (the cases run grouped), so the matrix takes about two minutes.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.natlab_support import natlab, natlab_lab, require_natlab, tcp_reachable

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.natlab]

__all__ = ["natlab_lab"]  # a fixture: imported for pytest, not unused

KINDS = natlab.NAT_KINDS
CASES = [(dev, cli) for dev in KINDS for cli in KINDS]  # grouped by device NAT


def expected_path(device_nat: str, client_nat: str) -> str:
    """What the NATs allow, with STUN and TURN offered to both ends."""
    pair = (device_nat, client_nat)
    if "udp-blocked" in pair:
        return "relay"
    if "none" in pair:
        return "direct"  # a public host takes any check, so the other end's reaches it
    if "symmetric" in pair:
        # The symmetric end's checks leave by a port its peer never learnt, and
        # the peer's router lets in only what answers its own packets.
        return "relay"
    return "direct"


@pytest.fixture(scope="module")
def matrix(natlab_lab: Any) -> Iterator[Any]:
    natlab.build_matrix_lab(natlab_lab)
    runner = natlab.Matrix(natlab_lab)
    print(f"\n{natlab.TABLE_HEADER}")
    yield runner
    runner.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("device_nat", "client_nat"), CASES, ids=[f"{d}-{c}" for d, c in CASES])
def test_case_connects_on_the_expected_path_and_transfers_intact(
    matrix: Any, device_nat: str, client_nat: str
) -> None:
    result = matrix.run(device_nat, client_nat)
    print(natlab.table_row(result))
    for warning in result.warnings:
        print(f"    ! {warning}")
    assert result.connected, result.error
    assert result.transfer_ok, result.error
    expected = expected_path(device_nat, client_nat)
    if (device_nat, client_nat) == ("cone", "cone") and result.path == "relay":
        # TODO(issue 7, set-up on real paths): remove once a relay pair cannot
        # win this race. Hole punching needs the peer's check to open its NAT
        # first, so the device's first check is dropped and sent again (at
        # once, since workers/aiortc_tuning.py resends it when the peer's check
        # arrives; after 500 ms before that), and with aggressive nomination a
        # relay pair that succeeds meanwhile wins. Seen 1 run in 6 with the
        # 500 ms wait, not since; a strict failure here would be that race.
        pytest.xfail("cone-cone took the relay: the first hole-punching check was dropped")
    assert result.path == expected, result
    assert result.device_path == result.path, result  # both ends see the same pair

    through_turn = sum(sum(side.values()) for side in result.turn_bytes.values())
    if expected == "direct":
        assert through_turn < natlab.BIG_SIZE // 4, result.turn_bytes
    else:
        assert through_turn >= natlab.BIG_SIZE, result.turn_bytes
    for side, kind in (("device", device_nat), ("client", client_nat)):
        if kind == "udp-blocked":
            # Its only way out: TURN over TCP carried the whole transfer.
            assert result.turn_bytes[side]["tcp"] >= natlab.BIG_SIZE, result.turn_bytes
            assert result.relay_via[side] == "tcp", result
            other = "client" if side == "device" else "device"
            if result.relay_via.get(other) is None:
                # One relay on the path: all its bytes are this side's TCP. With
                # both ends relaying (relay/relay), the other end's UDP relay
                # carries the transfer as well and "the most bytes" is a tie.
                assert result.relay_transport == "tcp", result


# -- the building blocks other tests use ----------------------------------------------


def test_nat_kinds_map_ports_as_documented(natlab_lab: Any) -> None:
    lab = natlab_lab
    public = lab.add_site("t-none", "none")
    cone = lab.add_site("t-cone", "cone")
    symmetric = lab.add_site("t-symmetric", "symmetric")
    blocked = lab.add_site("t-udp-blocked", "udp-blocked")

    assert lab.mapped_address(public, 40001) == (public.address, 40001)
    # MASQUERADE keeps a free source port: the same mapping towards anyone.
    assert lab.mapped_address(cone, 40001) == (cone.public_address, 40001)
    # --random-fully draws every mapping's port: three sockets, three random ports.
    mapped = [lab.mapped_address(symmetric, port) for port in (40001, 40002, 40003)]
    assert {host for host, _ in mapped} == {symmetric.public_address}
    assert [port for _, port in mapped] != [40001, 40002, 40003]
    # No UDP leaves the blocked site, TCP does (signaling).
    with pytest.raises(natlab.LabError, match="no STUN answer"):
        lab.mapped_address(blocked, 40001)
    assert tcp_reachable(blocked, natlab.PUBLIC_ADDR, natlab.SIGNAL_PORT)


def test_idle_udp_mappings_expire_after_the_routers_timeout(natlab_lab: Any) -> None:
    lab = natlab_lab
    site = lab.add_site("t-expiry", "symmetric", udp_timeout=2)
    assert site.router.run("sysctl", "-n", "net.netfilter.nf_conntrack_udp_timeout") == "2\n"
    first = lab.mapped_address(site, 40001)
    assert lab.mapped_address(site, 40001) == first  # in use: the mapping holds

    deadline = time.monotonic() + 15
    while any("sport=40001 " in entry for entry in site.mappings()):
        assert time.monotonic() < deadline, site.mappings()
        time.sleep(0.2)  # polling the router's table: conntrack sends no event here
    # A new mapping, with a new random port: what a peer idle past the timeout meets.
    assert lab.mapped_address(site, 40001) != first


def test_partition_drops_everything_between_two_sites_until_restored(natlab_lab: Any) -> None:
    lab = natlab_lab
    a, b = lab.add_site("t-part-a", "none"), lab.add_site("t-part-b", "cone")
    server = a.host.spawn(
        [sys.executable, "-m", "http.server", "9000", "--bind", a.address],
        name="listener",
    )
    lab.processes.append(server)
    server.wait_line("Serving HTTP")
    assert tcp_reachable(b, a.address, 9000)

    lab.partition(a, b)
    assert not tcp_reachable(b, a.address, 9000)
    # Only the two sites are cut off from each other, not from the public segment.
    assert lab.mapped_address(a, 40001) == (a.address, 40001)
    assert tcp_reachable(b, natlab.PUBLIC_ADDR, natlab.SIGNAL_PORT)

    a.uplink.restore()
    assert tcp_reachable(b, a.address, 9000)
    lab.stop(server)


def test_udp_drop_and_loss_apply_to_the_site_until_cleared(natlab_lab: Any) -> None:
    lab = natlab_lab
    site = lab.add_site("t-loss", "cone")
    site.uplink.drop(proto="udp")
    with pytest.raises(natlab.LabError, match="no STUN answer"):
        lab.mapped_address(site, 40001)
    assert tcp_reachable(site, natlab.PUBLIC_ADDR, natlab.SIGNAL_PORT)
    site.uplink.restore()
    assert lab.mapped_address(site, 40001) == (site.public_address, 40001)

    site.uplink.set_loss(5)
    rules = site.uplink.iptables("-S", natlab.LOSS_CHAIN)
    drawn = re.search(r"--mode random --probability (\S+) -j DROP", rules)
    assert drawn is not None and float(drawn[1]) == pytest.approx(0.05), rules
    site.uplink.set_loss(100)
    with pytest.raises(natlab.LabError, match="no STUN answer"):
        lab.mapped_address(site, 40001)
    site.uplink.set_loss(0)
    assert lab.mapped_address(site, 40001) == (site.public_address, 40001)


@pytest.mark.parametrize("kind", ["none", "cone"])
def test_renumber_gives_the_site_new_addresses(natlab_lab: Any, kind: str) -> None:
    lab = natlab_lab
    site = lab.add_site(f"t-move-{kind}", kind)
    old_address, old_public = site.address, site.public_address
    assert lab.mapped_address(site, 40001)[0] == old_public

    address, public = lab.renumber(site)
    assert (site.address, site.public_address) == (address, public)
    assert address != old_address and public != old_public
    assert f"inet {address}/24" in site.host.ip("addr", "show", "eth0")
    assert lab.mapped_address(site, 40001)[0] == public
    assert tcp_reachable(site, natlab.PUBLIC_ADDR, natlab.SIGNAL_PORT)


def test_a_failed_build_leaves_no_namespace_process_or_file(monkeypatch: Any) -> None:
    require_natlab()

    def broken_coturn(lab: Any) -> Any:
        process = lab.public.spawn(["sh", "-c", "echo 'no relay today' >&2; exit 3"], name="coturn")
        lab.processes.append(process)
        return process

    monkeypatch.setattr(natlab.Lab, "_start_coturn", broken_coturn)
    lab = natlab.Lab(tag=f"{os.getpid()}f")
    with pytest.raises(natlab.LabError, match=r"coturn exited with 3.*no relay today"):
        lab.build()
    assert not [
        ns for ns in natlab.run(["ip", "netns", "list"]).split() if ns.startswith(lab.prefix)
    ]
    assert not lab.workdir.exists()
    assert lab.signal.proc.poll() is not None and lab.coturn.proc.poll() is not None


def test_explicit_turn_options_with_a_static_coturn_user_relay_a_session() -> None:
    """``--stun``/``--turn``/``--turn-user`` and a long-term coturn user, no handout."""
    require_natlab()
    with natlab.Lab(turn_auth="static", tag=f"{os.getpid()}s") as lab:
        natlab.build_matrix_lab(lab, ["symmetric"])
        matrix = natlab.Matrix(lab)
        try:
            result = matrix.run("symmetric", "symmetric")
        finally:
            matrix.close()
    print(natlab.table_row(result))
    assert result.transfer_ok, result.error
    assert result.path == "relay" and result.device_path == "relay", result
