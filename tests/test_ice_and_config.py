import ipaddress

import aioice.ice
import pytest
from aiortc import RTCIceTransportPolicy

from protocol.ice import IceServer
from workers.ice import (
    interface_addresses,
    parse_networks,
    restrict_host_addresses,
    rtc_configuration,
)


def test_no_ice_servers_means_an_empty_list_not_aiortcs_default() -> None:
    assert rtc_configuration([]).iceServers == []


def test_ice_servers_become_aiortc_servers_and_policy() -> None:
    config = rtc_configuration(
        [IceServer("stun:127.0.0.1:3478"), IceServer("turn:127.0.0.1:3478", "u", "p")], "relay"
    )
    assert [s.urls for s in config.iceServers] == [["stun:127.0.0.1:3478"], ["turn:127.0.0.1:3478"]]
    assert (config.iceServers[1].username, config.iceServers[1].credential) == ("u", "p")
    assert config.iceTransportPolicy == RTCIceTransportPolicy.RELAY
    assert rtc_configuration([]).iceTransportPolicy == RTCIceTransportPolicy.ALL


def test_host_allowlist_keeps_only_matching_addresses_loopback_included() -> None:
    try:
        restrict_host_addresses(parse_networks(["127.0.0.0/8"]))
        chosen = aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True)
        assert chosen and all(ipaddress.ip_address(a).is_loopback for a in chosen)
        assert "127.0.0.1" in chosen  # aioice alone never offers it
        unused = next(
            a
            for a in ("203.0.113.77", "198.51.100.77", "192.0.2.177")
            if a not in interface_addresses()
        )
        restrict_host_addresses(
            parse_networks([unused])
        )  # a documentation address, on no interface
        assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True) == []
    finally:
        restrict_host_addresses(())
    assert "127.0.0.1" not in aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False)
    assert "127.0.0.1" in interface_addresses()


def test_bad_networks_are_reported() -> None:
    with pytest.raises(ValueError, match="bad ICE host address 'not-an-ip'"):
        parse_networks(["not-an-ip"])


def test_aiortc_tuning_applies_only_to_the_verified_versions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from workers import aiortc_tuning

    assert aiortc_tuning.versions_verified()  # the locked versions
    assert aiortc_tuning.install()
    servers = [
        IceServer("stun:127.0.0.1:1"),
        IceServer("stun:127.0.0.1:2"),
        IceServer("turn:127.0.0.1:3", "u", "p"),
        IceServer("turns:127.0.0.1:4", "u", "p"),
    ]
    assert aiortc_tuning.stock_limits(servers) == []
    monkeypatch.setattr(aiortc_tuning, "version", lambda name: "9.9.9")
    assert not aiortc_tuning.versions_verified()
    # Stock aiortc keeps the first STUN and the first TURN server: the rest is named.
    monkeypatch.setattr(aiortc_tuning, "_installed", False)
    assert aiortc_tuning.stock_limits(servers) == ["stun:127.0.0.1:2", "turns:127.0.0.1:4"]
