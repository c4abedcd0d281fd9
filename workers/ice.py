"""ICE configuration: STUN/TURN servers and the host-address allowlist.

RFC 8445 host candidates come from every interface address aioice finds. Users
often want fewer (hide a VPN or container bridge; keep a test on loopback), and
aioice never offers 127.0.0.1 at all. :func:`restrict_host_addresses` replaces
aioice's address enumeration with one that keeps only addresses inside the
allowed networks, loopback included when asked for.

The allowlist is process-wide because aioice looks the addresses up through a
module-level function; every PeerConnection a process makes shares it. That
matches the process model: one worker process per session, one CLI per forward.

With no ICE servers configured we pass an empty list to aiortc: given ``None``
it would try a public STUN server and stall about five seconds offline. The
servers themselves are :class:`protocol.ice.IceServer`; how aiortc gathers with
several of them is :mod:`workers.aiortc_tuning`.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Sequence

import aioice.ice
import ifaddr
from aiortc import RTCConfiguration, RTCIceServer, RTCIceTransportPolicy

from protocol.ice import IcePolicy, IceServer
from workers import aiortc_tuning

log = logging.getLogger("tunnelctl.ice")


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


_POLICIES = {"all": RTCIceTransportPolicy.ALL, "relay": RTCIceTransportPolicy.RELAY}


def rtc_configuration(servers: Sequence[IceServer], policy: IcePolicy = "all") -> RTCConfiguration:
    """An aiortc configuration that never falls back to aiortc's default STUN server."""
    ignored = aiortc_tuning.stock_limits(servers)
    if ignored:
        log.warning("ICE servers ignored by this aiortc: %s", ", ".join(ignored))
    return RTCConfiguration(
        iceServers=[
            RTCIceServer(urls=[s.url], username=s.username, credential=s.credential)
            for s in servers
        ],
        iceTransportPolicy=_POLICIES[policy],
    )


def parse_networks(specs: Iterable[str]) -> tuple[Network, ...]:
    """Parse ``127.0.0.1``, ``10.1.0.0/16``, ``::1`` ... into networks; ValueError if bad."""
    networks = []
    for spec in specs:
        try:
            networks.append(ipaddress.ip_network(spec.strip(), strict=False))
        except ValueError:
            raise ValueError(f"bad ICE host address {spec!r}: expected an IP or CIDR") from None
    return tuple(networks)


def interface_addresses() -> list[str]:
    """Every IP address of this host's interfaces, loopback included."""
    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                found.append(ip.ip)
            elif ip.ip[2] == 0:  # IPv6 with a scope id (link-local) cannot be used bare
                found.append(ip.ip[0])
    return found


def restrict_host_addresses(allowed: Sequence[Network]) -> None:
    """Make every later ICE gathering in this process use only addresses in ``allowed``.

    An empty ``allowed`` restores aioice's own choice (all but loopback).
    """
    if not allowed:
        aioice.ice.get_host_addresses = _AIOICE_DEFAULT
        return

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        chosen = []
        for address in interface_addresses():
            ip = ipaddress.ip_address(address)
            if (ip.version == 4 and not use_ipv4) or (ip.version == 6 and not use_ipv6):
                continue
            if any(ip in network for network in allowed):
                chosen.append(address)
        if not chosen:
            log.warning(
                "no interface address matches the ICE host allowlist %s",
                ", ".join(str(n) for n in allowed),
            )
        return chosen

    aioice.ice.get_host_addresses = get_host_addresses


_AIOICE_DEFAULT = aioice.ice.get_host_addresses
