"""Every change we make to aiortc's and aioice's behaviour, in one place.

aiortc 1.16 turns its ``iceServers`` into aioice ``Connection`` arguments that
hold one STUN and one TURN server (``rtcicetransport.connection_kwargs``
keeps the first of each and drops the rest without a word), and aioice 0.13
gathers with those two only. Here, for the versions listed in
:data:`VERIFIED`, candidates are gathered from every configured server in
parallel (RFC 8445 §5.1.1: one server-reflexive candidate per host candidate
and STUN server, one relayed candidate per TURN server), and a server that
fails is logged with the reason instead of vanishing. TURN over TLS
(``turns:``) uses the default TLS context: the system's CAs, or
``SSL_CERT_FILE``.

aioice also keeps using a TURN allocation that the server closed or refused
(RFC 8656 §7.3/§12: 437 Allocation Mismatch, 438 Stale Nonce, 400 after the
client's NAT mapping changed): every channel bind fails, silently. Here a
relay whose refresh or channel bind fails, or whose connection to the server
is lost, is reported to ``Connection.tunnelctl_on_relay_lost(url, reason)``
when set, so the session can fail or re-gather visibly (:mod:`workers.peer`);
:func:`failed_servers` lists the servers a gathering got nothing from.

With other aiortc/aioice versions nothing is patched: :func:`install` logs a
warning once, and :func:`stock_limits` tells the caller what stock aiortc
will ignore, so that it is said, not silently dropped. ``pyproject.toml`` pins
the verified range.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Sequence
from importlib.metadata import version
from typing import Any, Final

import aioice.candidate
import aioice.ice
import aioice.turn
import aiortc.rtcicetransport
from aioice import stun

from protocol.ice import IceServer, IceUrl

log = logging.getLogger("tunnelctl.ice")

#: Versions whose internals this module was read against and tested with.
VERIFIED: Final = {"aiortc": "1.16.", "aioice": "0.13."}
GATHER_TIMEOUT: Final = 5.0

RelayLost = Callable[[str, str], None]


def versions_verified() -> bool:
    return all(version(name).startswith(prefix) for name, prefix in VERIFIED.items())


_installed: bool | None = None


def install() -> bool:
    """Patch aiortc/aioice once per process; return whether the patches are active."""
    global _installed
    if _installed is not None:
        return _installed
    _installed = versions_verified()
    if not _installed:
        log.warning(
            "aiortc %s / aioice %s are not the versions tunnelctl was verified with "
            "(aiortc %sx, aioice %sx): only the first STUN and the first TURN server "
            "will be used, and a lost TURN allocation is not noticed",
            version("aiortc"),
            version("aioice"),
            VERIFIED["aiortc"],
            VERIFIED["aioice"],
        )
        return False
    _patch_gatherer()
    _patch_gathering()
    _patch_relay_loss()
    return True


def stock_limits(servers: Sequence[IceServer]) -> list[str]:
    """What stock aiortc would ignore of ``servers`` (empty once :func:`install` patched)."""
    if install():
        return []
    ignored, seen = [], set()
    for server in servers:
        kind = "turn" if server.parsed.is_turn else "stun"
        if kind in seen:
            ignored.append(server.url)
        seen.add(kind)
    return ignored


# --- every server gathered ------------------------------------------------------


def _patch_gatherer() -> None:
    """Keep the whole server list on the aioice Connection (aiortc keeps the first of each)."""
    gatherer_class = aiortc.rtcicetransport.RTCIceGatherer
    original_init = gatherer_class.__init__

    def init(self: Any, iceServers: Any = None, *args: Any, **kwargs: Any) -> None:
        original_init(self, [], *args, **kwargs)
        servers: list[tuple[IceServer, IceUrl]] = []
        for rtc_server in iceServers or []:
            urls = rtc_server.urls if isinstance(rtc_server.urls, list) else [rtc_server.urls]
            for url in urls:
                server = IceServer(url, rtc_server.username, rtc_server.credential)
                servers.append((server, server.parsed))
        connection = self._connection
        connection.tunnelctl_servers = tuple(servers)
        # aioice reads these to decide whether relay-only gathering can work.
        turn = next((p for _, p in servers if p.is_turn), None)
        connection.turn_server = (turn.host, turn.port) if turn else None
        stun_url = next((p for _, p in servers if not p.is_turn), None)
        connection.stun_server = (stun_url.host, stun_url.port) if stun_url else None

    gatherer_class.__init__ = init  # type: ignore[method-assign]


def _patch_gathering() -> None:
    stock = aioice.ice.Connection.get_component_candidates

    async def get_component_candidates(
        self: aioice.ice.Connection, component: int, addresses: list[str], timeout: int = 5
    ) -> list[aioice.Candidate]:
        servers: tuple[tuple[IceServer, IceUrl], ...] | None = getattr(
            self, "tunnelctl_servers", None
        )
        if servers is None:
            return await stock(self, component, addresses, timeout)
        # Host candidates the stock way, with the servers hidden from it.
        saved = self.stun_server, self.turn_server
        self.stun_server = self.turn_server = None
        try:
            candidates = await stock(self, component, addresses, timeout)
        finally:
            self.stun_server, self.turn_server = saved
        host_protocols = [p for p in self._protocols if p.local_candidate in candidates]
        labels: dict[asyncio.Task[Any], str] = {}
        for server, url in servers:
            if url.is_turn:
                labels[asyncio.ensure_future(_relay(self, component, server, url))] = (
                    f"TURN server {server.url}"
                )
                continue
            for protocol in host_protocols:
                if ipaddress.ip_address(protocol.local_candidate.host).version == 4:
                    lookup = aioice.ice.server_reflexive_candidate(protocol, (url.host, url.port))
                    labels[asyncio.ensure_future(lookup)] = f"STUN server {server.url}"
        if not labels:
            return candidates
        done, pending = await asyncio.wait(labels, timeout=min(timeout, GATHER_TIMEOUT))
        failed: list[str] = getattr(self, "tunnelctl_failed", [])
        self.tunnelctl_failed = failed  # type: ignore[attr-defined]
        for task in pending:
            task.cancel()
            log.warning("%s: no answer in %g s", labels[task], min(timeout, GATHER_TIMEOUT))
            failed.append(labels[task])
        seen = {(c.type, c.host, c.port) for c in candidates}
        for task in done:
            exc = task.exception()
            if exc is not None:
                log.warning("%s: %s", labels[task], _describe(exc))
                failed.append(labels[task])
                continue
            candidate, relay_protocol = task.result()
            if relay_protocol is not None:
                self._protocols.append(relay_protocol)
            elif (candidate.type, candidate.host, candidate.port) in seen:
                continue  # two STUN servers saw the same mapping
            seen.add((candidate.type, candidate.host, candidate.port))
            candidates.append(candidate)
        return candidates

    aioice.ice.Connection.get_component_candidates = get_component_candidates  # type: ignore[method-assign]


async def _relay(
    connection: aioice.ice.Connection, component: int, server: IceServer, url: IceUrl
) -> tuple[aioice.Candidate, aioice.ice.StunProtocol]:
    candidate, protocol = await aioice.ice.relayed_candidate(
        component=component,
        hide_related_address=connection._transport_policy == aioice.ice.TransportPolicy.RELAY,
        protocol_factory=lambda: aioice.ice.StunProtocol(connection),
        turn_server=(url.host, url.port),
        turn_username=server.username,
        turn_password=server.credential,
        turn_ssl=url.scheme == "turns",
        turn_transport=url.transport or "udp",
    )
    # Relays on one server over UDP and TCP share an address: tell them apart.
    transport = url.relay_transport or "udp"
    candidate.foundation = aioice.candidate.candidate_foundation("relay", transport, candidate.host)
    protocol.tunnelctl_url = server.url  # type: ignore[attr-defined]
    protocol.tunnelctl_relay_transport = transport  # type: ignore[attr-defined]
    log.debug("relayed candidate %s:%d via %s", candidate.host, candidate.port, server.url)
    return candidate, protocol


# --- a lost allocation is noticed ------------------------------------------------


def failed_servers(connection: object) -> list[str]:
    """The servers (``"TURN server URL"``, ``"STUN server URL"``) that failed to gather."""
    failed = getattr(connection, "tunnelctl_failed", [])
    return list(failed) if isinstance(failed, list) else []


def relay_transport(protocol: object) -> str | None:
    """``udp``, ``tcp`` or ``tls`` for a relay protocol gathered here, else ``None``."""
    value = getattr(protocol, "tunnelctl_relay_transport", None)
    return value if isinstance(value, str) else None


def _report_relay_lost(protocol: aioice.ice.StunProtocol, reason: str) -> None:
    if getattr(protocol, "tunnelctl_lost", False):
        return
    protocol.tunnelctl_lost = True  # type: ignore[attr-defined]
    url = getattr(protocol, "tunnelctl_url", "TURN server")
    callback: RelayLost | None = getattr(protocol.receiver, "tunnelctl_on_relay_lost", None)
    if callback is None:
        # Lost while gathering, before anyone listens: kept for lost_relays().
        log.warning("%s: allocation lost: %s", url, reason)
        lost = getattr(protocol.receiver, "tunnelctl_lost_relays", [])
        lost.append((url, reason))
        protocol.receiver.tunnelctl_lost_relays = lost  # type: ignore[attr-defined]
    else:
        callback(url, reason)


def lost_relays(connection: object) -> list[tuple[str, str]]:
    """``(url, reason)`` of relays lost before ``tunnelctl_on_relay_lost`` was set."""
    lost = getattr(connection, "tunnelctl_lost_relays", [])
    return list(lost) if isinstance(lost, list) else []


def _patch_relay_loss() -> None:
    stun_protocol = aioice.ice.StunProtocol
    stock_error = stun_protocol.error_received
    stock_lost = stun_protocol.connection_lost

    def error_received(self: aioice.ice.StunProtocol, exc: Exception) -> None:
        stock_error(self, exc)
        # TurnTransport reports a failed channel bind here; for a relay that
        # means the server no longer knows or accepts the allocation.
        closing = getattr(self.receiver, "_closing", False)
        if relay_transport(self) and not closing and isinstance(exc, stun.TransactionError):
            _report_relay_lost(self, f"channel bind failed: {_describe(exc)}")

    def connection_lost(self: aioice.ice.StunProtocol, exc: Exception | None) -> None:
        stock_lost(self, exc)
        closing = getattr(self.receiver, "_closing", False)
        if relay_transport(self) is not None and not closing:
            detail = f": {exc}" if exc else " (or its refresh failed)"
            _report_relay_lost(self, "connection to the server lost" + detail)

    stun_protocol.error_received = error_received  # type: ignore[method-assign]
    stun_protocol.connection_lost = connection_lost  # type: ignore[method-assign]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, stun.TransactionFailed):
        code = exc.response.attributes.get("ERROR-CODE")
        if code:
            return f"error {code[0]} {code[1]}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
