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

A dead path is noticed in bounded time, and connects lose no time to NATs:

* **Consent freshness in bounded time** (RFC 7675). aioice checks consent every
  5 s and gives up after 6 consecutive failures: a dead path is noticed after
  about 30 s. Here consent expires when no check has been answered for the
  connection's keepalive (:func:`set_keepalive`, default
  ``protocol.ice.DEFAULT_KEEPALIVE``), checked five times per keepalive at
  randomised (0.8-1.2x) intervals as RFC 7675 section 5.1 randomises them. An
  expired connection is closed exactly as aioice closes it, and
  :func:`consent_expired` tells why. Consent checks are plain STUN Binding
  requests that every ICE agent answers, so a browser peer needs nothing: this
  is why we chose it over a keepalive frame of our own.
* **A check answered by the peer is retried at once** (RFC 8445 section
  7.3.1.4). Behind a NAT, the first check into the peer is usually dropped: the
  peer has not yet sent anything that opens its NAT. The peer's own check then
  arrives, and RFC 8445 says to replace our in-progress check with a triggered
  one; aioice instead waits for its fixed 500 ms retransmission timer. We
  retransmit the pending request when the peer's check arrives, which saves
  those 500 ms on every NATed connect.
* **A bounded STUN lookup.** A STUN server that cannot be reached (UDP
  blocked, path down) would hold gathering for :data:`GATHER_TIMEOUT`; real
  STUN round trips are far below :data:`STUN_TIMEOUT`, after which the lookup
  is dropped (host and relay candidates are unaffected), and once a relay is
  allocated a pending lookup gets only :data:`STUN_GRACE`, and a TURN server
  that has not answered yet about as long as that relay took (see
  :func:`_wait_for_servers`).
* **A bound on DataChannel message reassembly**: see
  :func:`_bound_message_reassembly`.
* **DataChannel throughput and round trips** (RFC 4960/9260 SCTP: delayed
  SACKs, bundling, the peer's receive window, a cheaper per-packet path): see
  :func:`_tune_sctp`, :func:`_tune_udp` and :func:`_tune_dtls_reads`.
* **A browser's mDNS candidates not waited for** (Chromium hides
  host addresses behind ``.local`` names): see :func:`_skip_mdns_resolution`.

Every change keeps the wire format standard, so a tuned peer talks to an
untuned one (a browser, stock aiortc); the tests run a stock peer against a
tuned one.

With other aiortc/aioice versions, or with ``TUNNELCTL_STOCK_AIORTC=1`` in the
environment, nothing is patched: :func:`install` logs why once, and
:func:`stock_limits` tells the caller what stock aiortc will ignore, so that it
is said, not silently dropped. ``pyproject.toml`` pins the verified range.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib.metadata import version
from typing import Any, Final

import aioice.candidate
import aioice.ice
import aioice.mdns
import aioice.turn
import aiortc.rtcicetransport
from aioice import stun
from aiortc import RTCPeerConnection

from protocol.ice import DEFAULT_KEEPALIVE, IceServer, IceUrl

log = logging.getLogger("tunnelctl.ice")

#: Versions whose internals this module was read against and tested with.
VERIFIED: Final = {"aiortc": "1.16.", "aioice": "0.13."}
GATHER_TIMEOUT: Final = 5.0
#: Seconds a STUN lookup may take before gathering goes on without it.
STUN_TIMEOUT: Final = 1.0
#: Seconds a STUN lookup may still take once every TURN allocation is done.
STUN_GRACE: Final = 0.05
#: Least time a TURN allocation may still take once another relay is allocated.
TURN_GRACE: Final = 0.25
#: The environment variable that keeps aiortc/aioice stock (tests, comparisons).
STOCK_ENV: Final = "TUNNELCTL_STOCK_AIORTC"
#: Consent checks per keepalive period: four can be lost in a row before the
#: fifth's answer is late, which keeps 5 % random loss (one chance in 160,000
#: per period) from ever ending a live session.
CHECKS_PER_KEEPALIVE: Final = 5
#: How long a consent check's answer may take (one retransmission at 0.5 s).
CONSENT_RETRANSMISSIONS: Final = 1
#: Seconds a TURN allocation's deletion may take when its connection closes.
TURN_DELETE_TIMEOUT: Final = 2.0
#: The most one DataChannel message may grow to while being reassembled before
#: the session is ended. Our messages are at most 64 KiB (PROTOCOL.md §2.1) and
#: aiortc advertises 256 KiB; the slack covers a lost first fragment or two.
MESSAGE_REASSEMBLY_LIMIT: Final = 1024 * 1024

RelayLost = Callable[[str, str], None]


def versions_verified() -> bool:
    return all(version(name).startswith(prefix) for name, prefix in VERIFIED.items())


_installed: bool | None = None
_background: set[asyncio.Future[Any]] = set()


def install() -> bool:
    """Patch aiortc/aioice once per process; return whether the patches are active."""
    global _installed
    if _installed is not None:
        return _installed
    if os.environ.get(STOCK_ENV) == "1":
        log.info("aiortc/aioice left stock (%s=1)", STOCK_ENV)
        _installed = False
        return False
    _installed = versions_verified()
    if not _installed:
        log.warning(
            "aiortc %s / aioice %s are not the versions tunnelctl was verified with "
            "(aiortc %sx, aioice %sx): only the first STUN and the first TURN server "
            "will be used, a lost TURN allocation is not noticed, a dead path takes "
            "~30 s to notice and NATed connects ~0.5 s longer",
            version("aiortc"),
            version("aioice"),
            VERIFIED["aiortc"],
            VERIFIED["aioice"],
        )
        return False
    _patch_gatherer()
    _patch_gathering()
    _patch_relay_loss()
    _tune_sctp()
    _tune_udp()
    _tune_dtls_reads()
    _bound_message_reassembly()
    _bound_consent()
    _retry_checks_answered_by_peer()
    _bound_stun_lookup()
    _bound_turn_delete()
    _skip_mdns_resolution()
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
        started = asyncio.get_running_loop().time()
        done, pending = await _wait_for_servers(labels, min(timeout, GATHER_TIMEOUT))
        waited = asyncio.get_running_loop().time() - started
        failed: list[str] = getattr(self, "tunnelctl_failed", [])
        self.tunnelctl_failed = failed  # type: ignore[attr-defined]
        for task in pending:
            task.cancel()
            _server_failed(labels[task], f"no answer in {waited:.1f} s")
            failed.append(labels[task])
        seen = {(c.type, c.host, c.port) for c in candidates}
        for task in done:
            exc = task.exception()
            if exc is not None:
                _server_failed(labels[task], _describe(exc))
                failed.append(labels[task])
                continue
            _FAILING.discard(labels[task])
            candidate, relay_protocol = task.result()
            if relay_protocol is not None:
                self._protocols.append(relay_protocol)
            elif (candidate.type, candidate.host, candidate.port) in seen:
                continue  # two STUN servers saw the same mapping
            seen.add((candidate.type, candidate.host, candidate.port))
            candidates.append(candidate)
        return candidates

    aioice.ice.Connection.get_component_candidates = get_component_candidates  # type: ignore[method-assign]


#: Servers whose last answer in this process was a failure. An idle worker
#: gathers again every 20 s, and behind a network that blocks UDP the same
#: servers fail every time: said once at WARNING, then at DEBUG until a success.
_FAILING: set[str] = set()


def _server_failed(label: str, why: str) -> None:
    level = logging.DEBUG if label in _FAILING else logging.WARNING
    _FAILING.add(label)
    log.log(level, "%s: %s", label, why)


async def _wait_for_servers(
    labels: dict[asyncio.Task[Any], str], timeout: float
) -> tuple[set[asyncio.Task[Any]], set[asyncio.Task[Any]]]:
    """Wait for the servers' answers, at most ``timeout``; return (done, pending).

    A STUN answer takes one round trip, a TURN allocation at least two (three
    over TCP). So once every TURN server has answered and a relay is
    allocated, a STUN lookup still pending lost its packets or is blocked (UDP
    blocked, TURN over TCP the way out: a common network): it gets
    :data:`STUN_GRACE` more, not the rest of :data:`STUN_TIMEOUT`. A TURN
    server still silent when another has allocated gets as long again as that
    took (at least :data:`TURN_GRACE`), not the rest of the gathering timeout.
    Without a relay, every server gets its full time.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + timeout
    done: set[asyncio.Task[Any]] = set()
    pending = set(labels)
    while pending and loop.time() < deadline:
        finished, pending = await asyncio.wait(
            pending, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED
        )
        done |= finished
        turn_pending = any(labels[t].startswith("TURN") for t in pending)
        relayed = any(
            labels[t].startswith("TURN") and not t.cancelled() and t.exception() is None
            for t in done
        )
        if pending and relayed:
            # A TURN server still silent once another has allocated a relay is
            # most likely unreachable the same way (UDP blocked, TCP the way
            # out: the relay over TCP took more round trips than one over UDP
            # would have). It gets as long again as the first relay took.
            grace = max(TURN_GRACE, loop.time() - started) if turn_pending else STUN_GRACE
            finished, pending = await asyncio.wait(
                pending, timeout=min(grace, max(0.0, deadline - loop.time()))
            )
            done |= finished
            break
    return done, pending


#: Local preference of a relayed candidate by how we reach the relay (RFC 8445
#: §5.1.2.1 leaves it to the agent; 65535 is aioice's one value for all).
RELAY_LOCAL_PREFERENCE: Final = {"udp": 65535, "tcp": 32767, "tls": 16383}


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
    # aioice gives every relay the same priority, so the first relay check to
    # succeed wins, often TCP's (the NAT lab saw slower TURN/TCP paths while
    # TURN/UDP worked). Prefer UDP, then TCP, then TLS, as browsers do
    # (RFC 8445 §5.1.2.2: the local preference is ours to choose).
    candidate.priority = aioice.candidate.candidate_priority(
        component, "relay", local_pref=RELAY_LOCAL_PREFERENCE[transport]
    )
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
    url = _url(protocol)
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
            if _error_code(exc) == FORBIDDEN:
                # RFC 8656 §12: the server refuses that one peer address (coturn's
                # denied-peer-ip ranges, e.g. the peer's private host candidate);
                # the allocation itself is fine.
                log.debug("%s: peer address refused: %s", _url(self), _describe(exc))
                return
            _report_relay_lost(self, f"channel bind failed: {_describe(exc)}")

    def connection_lost(self: aioice.ice.StunProtocol, exc: Exception | None) -> None:
        stock_lost(self, exc)
        closing = getattr(self.receiver, "_closing", False)
        if relay_transport(self) is not None and not closing:
            detail = f": {exc}" if exc else " (or its refresh failed)"
            _report_relay_lost(self, "connection to the server lost" + detail)

    stun_protocol.error_received = error_received  # type: ignore[method-assign]
    stun_protocol.connection_lost = connection_lost  # type: ignore[method-assign]


#: STUN error code 403 Forbidden (RFC 8656 §18): a permission or channel to
#: that peer address is not allowed.
FORBIDDEN = 403


def _error_code(exc: BaseException) -> int | None:
    if isinstance(exc, stun.TransactionFailed):
        code = exc.response.attributes.get("ERROR-CODE")
        if code:
            return int(code[0])
    return None


def _url(protocol: object) -> str:
    return str(getattr(protocol, "tunnelctl_url", "TURN server"))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, stun.TransactionFailed):
        code = exc.response.attributes.get("ERROR-CODE")
        if code:
            return f"error {code[0]} {code[1]}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- dead paths and connect time -------------------------------------------------


def set_keepalive(pc: RTCPeerConnection, seconds: float) -> None:
    """Declare ``pc``'s path dead after ``seconds`` without an answered consent check.

    Call it once the DataChannel transport exists (after ``createDataChannel``
    on the offerer, after ``setRemoteDescription`` on the answerer); calling it
    again is harmless. Without tuning it does nothing.
    """
    connection = _ice_connection(pc)
    if connection is not None:
        connection.tunnelctl_keepalive = seconds  # type: ignore[attr-defined]


def consent_expired(pc: RTCPeerConnection) -> float | None:
    """The keepalive after which ``pc``'s consent expired, or ``None`` if it has not."""
    connection = _ice_connection(pc)
    if connection is None:
        return None
    expired = getattr(connection, "tunnelctl_consent_expired", None)
    return float(expired) if expired is not None else None


def _ice_connection(pc: RTCPeerConnection) -> aioice.Connection | None:
    sctp = pc.sctp
    if sctp is None:
        return None
    connection: aioice.Connection = sctp.transport.transport._connection
    return connection


# --- consent freshness (RFC 7675) ---------------------------------------------


def _bound_consent() -> None:
    async def query_consent(self: aioice.Connection) -> None:
        assert self.remote_password is not None
        loop = asyncio.get_running_loop()
        key = self.remote_password.encode("utf8")
        last_answer = loop.time()
        checks: set[asyncio.Task[None]] = set()

        async def check(pair: aioice.ice.CandidatePair) -> None:
            nonlocal last_answer
            request = self.build_request(pair, nominate=False)
            with contextlib.suppress(stun.TransactionError):
                await pair.protocol.request(
                    request,
                    pair.remote_addr,
                    integrity_key=key,
                    retransmissions=CONSENT_RETRANSMISSIONS,
                )
                last_answer = loop.time()

        try:
            while True:
                keepalive = float(getattr(self, "tunnelctl_keepalive", DEFAULT_KEEPALIVE))
                interval = keepalive / CHECKS_PER_KEEPALIVE * random.uniform(0.8, 1.2)
                expires = last_answer + keepalive
                await asyncio.sleep(max(0.0, min(interval, expires - loop.time())))
                if loop.time() >= last_answer + keepalive:
                    break
                for pair in self._nominated.values():
                    task = loop.create_task(check(pair))
                    checks.add(task)
                    task.add_done_callback(checks.discard)
        finally:
            for task in checks:
                task.cancel()
        log.info("%s: consent expired, no answer for %.1f s", self, keepalive)
        self.tunnelctl_consent_expired = keepalive  # type: ignore[attr-defined]
        self._query_consent_task = None  # close() must not cancel the task it runs in
        # Wake the DTLS transport's pending recv() now: close() does it only after
        # closing every socket, and deleting a TURN allocation on a dead path waits.
        self._queue.put_nowait(None)
        await self.close()

    aioice.Connection.query_consent = query_consent  # type: ignore[method-assign]


# --- triggered checks (RFC 8445 section 7.3.1.4) ------------------------------


def _retry_checks_answered_by_peer() -> None:
    original = aioice.Connection.check_incoming
    in_progress = aioice.ice.CandidatePair.State.IN_PROGRESS

    def check_incoming(
        self: aioice.Connection,
        message: stun.Message,
        addr: tuple[str, int],
        protocol: aioice.ice.StunProtocol,
    ) -> None:
        original(self, message, addr, protocol)
        for pair in self._check_list:
            if pair.protocol is protocol and pair.remote_addr == addr:
                if pair.state == in_progress:
                    _retransmit_now(protocol, addr)
                return

    aioice.Connection.check_incoming = check_incoming  # type: ignore[method-assign]


def _retransmit_now(protocol: aioice.ice.StunProtocol, addr: tuple[str, int]) -> None:
    """Send again the pending request of the check to ``addr`` (same transaction)."""
    for transaction in protocol.transactions.values():
        # aioice keeps a transaction's request and address private.
        if transaction._Transaction__addr == addr:  # type: ignore[attr-defined]
            protocol.send_stun(transaction._Transaction__request, addr)  # type: ignore[attr-defined]
            return


# --- the STUN lookup ----------------------------------------------------------


def _bound_stun_lookup() -> None:
    original: Callable[..., Awaitable[Any]] = aioice.ice.server_reflexive_candidate

    async def server_reflexive_candidate(
        protocol: aioice.ice.StunProtocol, stun_server: tuple[str, int]
    ) -> Any:
        try:
            return await asyncio.wait_for(original(protocol, stun_server), STUN_TIMEOUT)
        except TimeoutError:
            log.info("STUN server %s:%s did not answer within %g s", *stun_server, STUN_TIMEOUT)
            raise

    aioice.ice.server_reflexive_candidate = server_reflexive_candidate


# --- TURN allocation deletion ------------------------------------------------------


def _bound_turn_delete() -> None:
    """Give up deleting a TURN allocation after :data:`TURN_DELETE_TIMEOUT`.

    aioice retries the deletion (a Refresh with lifetime 0) for about 40 s, and
    closing a connection waits for it: on a dead path or a changed address, a
    session's end (and anything awaiting it) took that long. The server frees
    an allocation it hears no more from when its lifetime ends (RFC 8656 §6);
    aioice's own ``delete`` closes the socket when cancelled.
    """
    original = aioice.turn.TurnClientMixin.delete

    async def delete(self: aioice.turn.TurnClientMixin) -> None:
        try:
            await asyncio.wait_for(original(self), TURN_DELETE_TIMEOUT)
        except TimeoutError:
            log.info("TURN allocation not deleted within %g s; it will expire", TURN_DELETE_TIMEOUT)

    aioice.turn.TurnClientMixin.delete = delete  # type: ignore[method-assign]


# --- DataChannel message reassembly -------------------------------------------


def _bound_message_reassembly() -> None:
    """End an association whose peer sends a message that never ends.

    aiortc reassembles a message of any size before anyone sees it (it ignores
    the max-message-size it advertises on receipt), and its reassembly is
    quadratic in CPU: one endless message costs the worker memory and CPU
    without bound. Its DATA handler is wrapped: each inbound stream counts the
    bytes since the last first-fragment; past the limit, the buffered data is
    dropped and the association aborted, which ends the session with its
    DataChannel. (Not the receive window: aiortc's own sender does not honour it.)
    """
    from aiortc.rtcsctptransport import SCTP_DATA_FIRST_FRAG, RTCSctpTransport

    original = RTCSctpTransport._receive_data_chunk

    async def receive_data_chunk(self: RTCSctpTransport, chunk: Any) -> None:
        if getattr(self, "tunnelctl_aborted", False):
            return  # aborting: keep nothing more
        stream = self._get_inbound_stream(chunk.stream_id)
        run = 0 if chunk.flags & SCTP_DATA_FIRST_FRAG else getattr(stream, "tunnelctl_run", 0)
        stream.tunnelctl_run = run + len(chunk.user_data)  # type: ignore[attr-defined]
        if stream.tunnelctl_run > MESSAGE_REASSEMBLY_LIMIT:  # type: ignore[attr-defined]
            log.warning("peer sent a message over %d bytes; aborting", MESSAGE_REASSEMBLY_LIMIT)
            self.tunnelctl_aborted = True  # type: ignore[attr-defined]
            for inbound in self._inbound_streams.values():
                inbound.reassembly.clear()
            task = asyncio.ensure_future(self.stop())
            _background.add(task)
            task.add_done_callback(_background.discard)
            return
        await original(self, chunk)

    RTCSctpTransport._receive_data_chunk = receive_data_chunk  # type: ignore[method-assign]


# --- SCTP: fewer packets, fewer SACKs, fewer Python calls per chunk ------------------

#: RFC 4960 §6.2 / RFC 9260 §6.2: a SACK for at least every second packet that
#: carries DATA, and none delayed longer than this (the RFCs' 200 ms).
SACK_EVERY: Final = 2
SACK_DELAY: Final = 0.2
#: RFC 7053 §3: the SACK-IMMEDIATELY (I) flag of a DATA chunk. An endpoint that
#: does not implement it ignores it (RFC 9260 §3.2: unknown flags are ignored).
SCTP_DATA_SACK_IMMEDIATELY: Final = 0x08
#: Flight size (bytes) under which the last chunk of a burst that filled the
#: window carries the I flag: a larger flight always has a second packet coming
#: to trigger the SACK.
SACK_IMMEDIATELY_FLIGHT: Final = 4 * 1160
#: DATA chunks (of ~1160 bytes) kept in SCTP's outbound queue, refilled from the
#: DataChannel queue on every SACK. Stock aiortc keeps one message, which sends
#: each small message in a packet of its own.
OUTBOUND_CHUNKS: Final = 64
#: Slow start grows cwnd by at most this many MTUs per SACK (RFC 3465's L, which
#: RFC 4960 §7.2.1's "at most one MTU" becomes when every second packet is SACKed:
#: the window still doubles per round trip, as one SACK per packet made it).
SLOW_START_MTUS: Final = 2
#: The receive window we advertise (a_rwnd, RFC 4960 §6.2), bytes; aiortc's is
#: 1 MiB. What really holds data waiting for a busy worker is the kernel's UDP
#: receive buffer, and Linux drops datagrams past ~200 of them by default (at
#: ~500 KB of accounted memory even with a larger SO_RCVBUF, measured here): a
#: window larger than that is a burst lost whenever the worker falls behind.
#: 256 KiB keeps a 20 ms path at ~13 MB/s. Measured two-process bulk throughput:
#: 128 KiB 10.6, 256 KiB 10.6-13.8, 512 KiB 9.8, 1 MiB 8.4-8.7 MB/s.
RECEIVE_WINDOW: Final = 256 * 1024
#: Least retransmission timeout, seconds. RFC 4960 §15 recommends 1 s, from
#: when paths were slow; Linux TCP uses 200 ms. A burst lost to a receiver
#: whose socket buffer overflowed (a busy worker) is often recovered only by
#: T3, and 1 s of silence per such loss dominated a bulk transfer's time.
RTO_MIN: Final = 0.2


def _tune_sctp() -> None:
    """Bundle chunks, delay SACKs, honour the peer's window (RFC 4960/9260, RFC 7053).

    Profiles of stock aiortc 1.16 moving 16 KiB messages between two processes
    (cProfile, both ends) show per-packet Python dominating: one SACK per DATA
    packet, which the sender handles in full (SACK processing plus a transmit
    pass, half its time), one packet per chunk however small, an asyncio task
    per message sent, and every packet written through four awaited layers
    (SCTP, DTLS, ICE transport, aioice connection). Here, for the verified
    versions:

    * **Delayed SACK** (RFC 4960 §6.2): a SACK for every second packet with
      DATA; at once for a duplicate, a packet that arrives while TSNs are
      missing (gap reports drive fast retransmit, §6.7), a packet that is not
      DATA, or a DATA chunk with the I flag (RFC 7053); otherwise within
      :data:`SACK_DELAY`, or sooner bundled with DATA we send.
    * **Bundling** (RFC 4960 §6.10): SACK, FORWARD TSN and DATA chunks share
      packets of at most ``SCTP_MAX_PACKET_LENGTH`` (1189) bytes, the size
      stock aiortc uses; messages sent in one event-loop turn are flushed
      together, and small messages share packets.
    * **Congestion window** grows per bytes acknowledged, up to
      :data:`SLOW_START_MTUS` MTUs per SACK in slow start (RFC 3465 with
      delayed SACKs); fast retransmit and T3 are aiortc's.
    * **The peer's receive window** (RFC 4960 §6.1 rule A, §6.2.1): no new DATA
      beyond the a_rwnd of the last SACK less what is in flight, except one
      chunk when nothing is (the zero-window probe). Stock aiortc ignores it.
    * **The advertised receive window** is :data:`RECEIVE_WINDOW`.
    * **RTO.Min** is :data:`RTO_MIN` rather than 1 s (RFC 4960 §15 makes it a
      recommendation); the RTO still follows the measured RTT (§6.3.1).
    * **The I flag** marks the last chunk of a burst cut by the windows, so a
      tuned peer SACKs it at once rather than after :data:`SACK_DELAY`.
    * **One synchronous write per packet**: DTLS encrypt and ``sendto`` on the
      nominated pair's transport, without the awaited layers (same calls, same
      errors); an in-order DATA chunk that completes a message, or cannot
      complete one, skips aiortc's reassembly scan.

    The wire format stays standard SCTP: a stock aiortc or browser peer sees
    bundled packets and fewer SACKs, both of which it already handles.
    """
    from aiortc import rtcsctptransport as sctp
    from aiortc.rtcdtlstransport import State as DtlsState
    from aiortc.utils import uint16_add, uint32_gt, uint32_gte
    from google_crc32c import extend as crc32c_extend
    from google_crc32c import value as crc32c
    from OpenSSL import SSL

    transport_class = sctp.RTCSctpTransport
    established = transport_class.State.ESTABLISHED
    data_chunk_class = sctp.DataChunk
    init_chunk_class = sctp.InitChunk
    mtu = sctp.USERDATA_MAX_LENGTH
    max_packet = sctp.SCTP_MAX_PACKET_LENGTH
    header_length = sctp.SCTP_COMMON_HEADER_LENGTH
    whole = sctp.SCTP_DATA_FIRST_FRAG | sctp.SCTP_DATA_LAST_FRAG
    last_frag = sctp.SCTP_DATA_LAST_FRAG
    unordered = sctp.SCTP_DATA_UNORDERED
    tsn_modulo = sctp.SCTP_TSN_MODULO
    zero_checksum = b"\x00\x00\x00\x00"
    stock_receive_sack = transport_class._receive_sack_chunk
    stock_receive_chunk = transport_class._receive_chunk
    stock_update_rto = transport_class._update_rto
    sack_chunk_class = sctp.SackChunk

    stock_init = transport_class.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        stock_init(self, *args, **kwargs)
        self._advertised_rwnd = RECEIVE_WINDOW

    stock_t3_expired = transport_class._t3_expired
    stock_t3_cancel = transport_class._t3_cancel

    def t3_restart(self: Any) -> None:
        # Every SACK that advances restarts T3: moving the deadline is cheaper
        # than cancelling and re-arming a timer; the timer re-arms itself late.
        if self._t3_handle is None:
            self._t3_handle = self._loop.call_later(self._rto, self._t3_expired)
            self.tunnelctl_t3_due = None
        else:
            self.tunnelctl_t3_due = self._loop.time() + self._rto

    def t3_expired(self: Any) -> None:
        due = getattr(self, "tunnelctl_t3_due", None)
        self.tunnelctl_t3_due = None
        if due is not None and due > self._loop.time():
            self._t3_handle = self._loop.call_at(due, self._t3_expired)
            return
        self.tunnelctl_marked = True
        stock_t3_expired(self)

    def t3_cancel(self: Any) -> None:
        self.tunnelctl_t3_due = None
        stock_t3_cancel(self)

    def update_rto(self: Any, rtt: float) -> None:
        stock_update_rto(self, rtt)
        self._rto = max(RTO_MIN, min(self._srtt + 4 * self._rttvar, sctp.SCTP_RTO_MAX))

    def write(self: Any, packet: bytes) -> None:
        """Encrypt one SCTP packet, send it on the nominated pair (as DTLS `_send_data`)."""
        dtls = self.transport
        if dtls._state != DtlsState.CONNECTED:
            raise ConnectionError("Cannot send encrypted data, not connected")
        ssl = dtls._ssl
        ssl.send(packet)
        try:
            data = ssl.bio_read(1500)
        except SSL.Error:
            return
        pair = dtls.transport._connection._nominated.get(1)
        if pair is None:
            raise ConnectionError("Cannot send data, not connected")
        pair.protocol.transport.sendto(data, pair.remote_addr)
        dtls._RTCDtlsTransport__tx_bytes += len(data)
        dtls._RTCDtlsTransport__tx_packets += 1

    def send_chunks(self: Any, chunks: list[bytes]) -> None:
        """Send serialized chunks, as few packets as fit (RFC 4960 §6.10)."""
        header = struct.pack(
            "!HHL", self._local_port, self._remote_port, self._remote_verification_tag
        )
        seed = crc32c(header + zero_checksum)
        packet: list[bytes] = []
        size = header_length
        for chunk in chunks:
            if packet and size + len(chunk) > max_packet:
                body = b"".join(packet)
                write(self, header + struct.pack("<L", crc32c_extend(seed, body)) + body)
                packet, size = [], header_length
            packet.append(chunk)
            size += len(chunk)
        if packet:
            body = b"".join(packet)
            write(self, header + struct.pack("<L", crc32c_extend(seed, body)) + body)

    def sack_bytes(self: Any) -> bytes:
        """The SACK chunk aiortc's ``_send_sack`` builds; the state it resets, reset."""
        if self._sack_misordered or self._sack_duplicates:
            gaps: list[list[int]] = []
            gap_next = None
            for tsn in sorted(self._sack_misordered):
                pos = (tsn - self._last_received_tsn) % tsn_modulo
                if tsn == gap_next:
                    gaps[-1][1] = pos
                else:
                    gaps.append([pos, pos])
                gap_next = (tsn + 1) % tsn_modulo
            sack = sack_chunk_class()
            sack.cumulative_tsn = self._last_received_tsn
            sack.advertised_rwnd = max(0, self._advertised_rwnd)
            sack.duplicates = self._sack_duplicates[:]
            sack.gaps = [(a, b) for a, b in gaps]
            data = bytes(sack)
            self._sack_duplicates.clear()
        else:
            data = struct.pack(
                "!BBHLLHH",
                3,
                0,
                16,
                self._last_received_tsn,
                max(0, self._advertised_rwnd),
                0,
                0,
            )
        self._sack_needed = False
        self.tunnelctl_unacked = 0
        self.tunnelctl_sack_now = False
        timer = getattr(self, "tunnelctl_sack_timer", None)
        if timer is not None:
            timer.cancel()
            self.tunnelctl_sack_timer = None
        return data

    def transmit(self: Any) -> None:
        """aiortc's ``_transmit`` (retransmissions, then new DATA within cwnd), bundled."""
        out: list[bytes] = []
        if self._sack_needed:
            out.append(sack_bytes(self))
        if self._forward_tsn_chunk is not None:
            out.append(bytes(self._forward_tsn_chunk))
            self._forward_tsn_chunk = None
            if not self._t3_handle:
                self._t3_start()
        burst = (2 if self._fast_recovery_exit is not None else 4) * mtu
        cwnd = min(self._flight_size + burst, self._cwnd)
        retransmit_earliest = True
        window_full = False
        # Only a gap report or T3 marks chunks for retransmission: without one
        # since the last complete pass, the sent queue is not scanned.
        if getattr(self, "tunnelctl_marked", False):
            for chunk in self._sent_queue:
                if chunk._retransmit:
                    if self._fast_recovery_transmit:
                        self._fast_recovery_transmit = False
                    elif self._flight_size >= cwnd:
                        window_full = True
                        break
                    self._flight_size_increase(chunk)
                    chunk._misses = 0
                    chunk._retransmit = False
                    chunk._sent_count += 1
                    out.append(bytes(chunk))
                    if retransmit_earliest:
                        self._t3_restart()
                retransmit_earliest = False
            else:
                self.tunnelctl_marked = False
        if not window_full:
            outbound = self._outbound_queue
            rwnd = getattr(self, "tunnelctl_rwnd", None)
            if rwnd is None:
                rwnd = self._ssthresh  # the peer's a_rwnd from its INIT until a SACK says more
            now = time.time()
            last = None
            while outbound:
                chunk = outbound[0]
                if self._flight_size >= cwnd or (self._flight_size and chunk._book_size > rwnd):
                    window_full = True
                    break
                outbound.popleft()
                self._sent_queue.append(chunk)
                self._flight_size_increase(chunk)
                rwnd -= chunk._book_size
                chunk._sent_count += 1
                chunk._sent_time = now
                if last is not None:
                    out.append(bytes(last))
                last = chunk
            self.tunnelctl_rwnd = rwnd
            if last is not None:
                if window_full and self._flight_size < SACK_IMMEDIATELY_FLIGHT:
                    # A window this small may be all in flight with its last
                    # packet's SACK delayed: ask for it at once (RFC 7053).
                    last.flags |= SCTP_DATA_SACK_IMMEDIATELY
                out.append(bytes(last))
                if not self._t3_handle:
                    self._t3_start()
        if out:
            send_chunks(self, out)

    async def transmit_async(self: Any) -> None:
        transmit(self)

    async def send_chunk(self: Any, chunk: Any) -> None:
        send_chunks(self, [bytes(chunk)])

    async def send_sack(self: Any) -> None:
        send_chunks(self, [sack_bytes(self)])

    def sack_timer_expired(self: Any) -> None:
        self.tunnelctl_sack_timer = None
        if self._sack_needed:
            with contextlib.suppress(ConnectionError):
                transmit(self)

    async def handle_data(self: Any, data: bytes) -> None:
        """aiortc's ``_handle_data``, with the SACK delayed as RFC 4960 §6.2 allows."""
        try:
            _, _, verification_tag, chunks = sctp.parse_packet(data)
        except ValueError:
            return
        if any(type(chunk) is init_chunk_class for chunk in chunks):
            if len(chunks) != 1:
                return
            expected_tag = 0
        else:
            expected_tag = self._local_verification_tag
        if verification_tag != expected_tag:
            return
        has_data = False
        for chunk in chunks:
            if type(chunk) is data_chunk_class:
                has_data = True
                if chunk.flags & SCTP_DATA_SACK_IMMEDIATELY:
                    self.tunnelctl_sack_now = True
            await self._receive_chunk(chunk)
        if not self._sack_needed:
            return
        unacked = getattr(self, "tunnelctl_unacked", 0) + 1
        self.tunnelctl_unacked = unacked
        if (
            unacked >= SACK_EVERY
            or not has_data
            or getattr(self, "tunnelctl_sack_now", False)
            or self._association_state != established
        ):
            send_chunks(self, [sack_bytes(self)])
        elif getattr(self, "tunnelctl_sack_timer", None) is None:
            self.tunnelctl_sack_timer = self._loop.call_later(SACK_DELAY, sack_timer_expired, self)

    async def receive_chunk(self: Any, chunk: Any) -> None:
        # aiortc's dispatch, with DATA and SACK (nearly every chunk) tried first.
        kind = type(chunk)
        if kind is data_chunk_class:
            await self._receive_data_chunk(chunk)
        elif kind is sack_chunk_class:
            await self._receive_sack_chunk(chunk)
        else:
            await stock_receive_chunk(self, chunk)

    async def receive_data_chunk(self: Any, chunk: Any) -> None:
        """aiortc's ``_receive_data_chunk`` with a fast path for in-order chunks."""
        self._sack_needed = True
        tsn = chunk.tsn
        last = self._last_received_tsn
        in_order = not self._sack_misordered and tsn == (last + 1) % tsn_modulo
        if in_order:
            self._last_received_tsn = tsn
            if self._sack_duplicates:
                self._sack_duplicates = [x for x in self._sack_duplicates if uint32_gt(x, tsn)]
        else:
            # A duplicate, or a chunk after or into a gap: SACK at once (RFC 4960 §6.7).
            self.tunnelctl_sack_now = True
            if self._mark_received(tsn):
                return
        stream = self._get_inbound_stream(chunk.stream_id)
        flags = chunk.flags
        ordered = not flags & unordered
        if (
            in_order
            and ordered
            and flags & whole == whole
            and not stream.reassembly
            and chunk.stream_seq == stream.sequence_number
        ):
            stream.sequence_number = uint16_add(stream.sequence_number, 1)
            await self._receive(chunk.stream_id, chunk.protocol, chunk.user_data)
        else:
            stream.add_chunk(chunk)
            self._advertised_rwnd -= len(chunk.user_data)
            # An in-order middle fragment of an ordered message completes nothing.
            if not (in_order and ordered and not flags & last_frag):
                for message in stream.pop_messages():
                    self._advertised_rwnd += len(message[2])
                    await self._receive(*message)
        if self._reconfig_deferred is not None:
            await self._reset_deferred_streams()

    async def receive_sack_chunk(self: Any, chunk: Any) -> None:
        """aiortc's ``_receive_sack_chunk``; without gap reports or recovery, a fast path."""
        if uint32_gt(self._last_sacked_tsn, chunk.cumulative_tsn):
            return
        if chunk.gaps or self._fast_recovery_exit is not None:
            self.tunnelctl_marked = True
            await stock_receive_sack(self, chunk)
            self.tunnelctl_rwnd = chunk.advertised_rwnd - self._flight_size
            return
        received_time = time.time()
        cumulative = chunk.cumulative_tsn
        self._last_sacked_tsn = cumulative
        cwnd_fully_utilized = self._flight_size >= self._cwnd
        done = done_bytes = 0
        sent = self._sent_queue
        while sent and uint32_gte(cumulative, sent[0].tsn):
            acked = sent.popleft()
            done += 1
            if not acked._acked:
                done_bytes += acked._book_size
            if acked._in_flight:
                acked._in_flight = False
                self._flight_size -= acked._book_size
            if done == 1 and acked._sent_count == 1:
                self._update_rto(received_time - acked._sent_time)
        if done and cwnd_fully_utilized:
            if self._cwnd <= self._ssthresh:
                self._cwnd += min(done_bytes, SLOW_START_MTUS * mtu)
            else:
                self._partial_bytes_acked += done_bytes
                if self._partial_bytes_acked >= self._cwnd:
                    self._partial_bytes_acked -= self._cwnd
                    self._cwnd += mtu
        self.tunnelctl_rwnd = chunk.advertised_rwnd - self._flight_size
        if not sent:
            self._t3_cancel()
        elif done:
            self._t3_restart()
        if (
            self._forward_tsn_streams
            or self._forward_tsn_chunk is not None
            or (sent and sent[0]._abandoned)
            or (self._outbound_queue and self._outbound_queue[0]._abandoned)
            or uint32_gt(self._advanced_peer_ack_tsn, cumulative)
        ):
            self._update_advanced_peer_ack_point()
        else:
            # Nothing abandoned (RFC 3758): the ack point simply follows the SACK.
            self._advanced_peer_ack_tsn = cumulative
        flush(self)

    def flush(self: Any) -> None:
        """aiortc's ``_data_channel_flush`` then ``_transmit``, refilling SCTP's queue."""
        if self._association_state != established:
            return
        queue = self._data_channel_queue
        outbound = self._outbound_queue
        while queue and len(outbound) < OUTBOUND_CHUNKS:
            channel, protocol, user_data = queue.popleft()
            stream_id = channel.id
            if stream_id is None:
                stream_id = self._data_channel_id
                while stream_id in self._data_channels:
                    stream_id += 2
                self._data_channels[stream_id] = channel
                channel._setId(stream_id)
            if protocol == sctp.WEBRTC_DCEP:
                enqueue(self, stream_id, protocol, user_data)
            else:
                expiry = None
                if channel.maxPacketLifeTime:
                    expiry = time.time() + channel.maxPacketLifeTime / 1000
                enqueue(
                    self,
                    stream_id,
                    protocol,
                    user_data,
                    expiry,
                    channel.maxRetransmits,
                    channel.ordered,
                )
                channel._addBufferedAmount(-len(user_data))
        transmit(self)
        if self._reconfig_queue and not self._reconfig_request:
            _spawn(self._transmit_reconfig())

    async def data_channel_flush(self: Any) -> None:
        flush(self)

    def flush_soon(self: Any) -> None:
        self.tunnelctl_flush_handle = None
        with contextlib.suppress(ConnectionError):
            flush(self)

    def data_channel_send(self: Any, channel: Any, data: bytes | str) -> None:
        """aiortc's ``_data_channel_send``; messages of one loop turn are flushed together."""
        if data == "":
            pp_id, user_data = sctp.WEBRTC_STRING_EMPTY, b"\x00"
        elif isinstance(data, str):
            pp_id, user_data = sctp.WEBRTC_STRING, data.encode("utf8")
        elif data == b"":
            pp_id, user_data = sctp.WEBRTC_BINARY_EMPTY, b"\x00"
        else:
            pp_id, user_data = sctp.WEBRTC_BINARY, data
        if self._remote_max_message_size and len(user_data) > self._remote_max_message_size:
            raise ValueError(
                f"Cannot send message of {len(user_data)} bytes, the remote party "
                f"only supports messages up to {self._remote_max_message_size} bytes"
            )
        channel._addBufferedAmount(len(user_data))
        self._data_channel_queue.append((channel, pp_id, user_data))
        if getattr(self, "tunnelctl_flush_handle", None) is None:
            self.tunnelctl_flush_handle = self._loop.call_soon(flush_soon, self)

    def enqueue(
        self: Any,
        stream_id: int,
        pp_id: int,
        user_data: bytes,
        expiry: float | None = None,
        max_retransmits: int | None = None,
        ordered: bool = True,
    ) -> None:
        """aiortc's ``_send`` without its transmit: fragment into DATA chunks."""
        stream_seq = self._outbound_stream_seq.get(stream_id, 0) if ordered else 0
        length = len(user_data)
        fragments = max(1, -(-length // mtu))
        base_flags = 0 if ordered else unordered
        tsn = self._local_tsn
        append = self._outbound_queue.append
        for fragment in range(fragments):
            chunk = data_chunk_class()
            flags = base_flags
            if fragment == 0:
                flags |= sctp.SCTP_DATA_FIRST_FRAG
            if fragment == fragments - 1:
                flags |= last_frag
            chunk.flags = flags
            chunk.tsn = tsn
            chunk.stream_id = stream_id
            chunk.stream_seq = stream_seq
            chunk.protocol = pp_id
            piece = (
                user_data if fragments == 1 else user_data[fragment * mtu : (fragment + 1) * mtu]
            )
            chunk.user_data = piece
            chunk._abandoned = False
            chunk._acked = False
            chunk._book_size = len(piece)
            chunk._expiry = expiry
            chunk._in_flight = False
            chunk._max_retransmits = max_retransmits
            chunk._misses = 0
            chunk._retransmit = False
            chunk._sent_count = 0
            chunk._sent_time = None
            tsn = (tsn + 1) % tsn_modulo
            append(chunk)
        self._local_tsn = tsn
        if ordered:
            self._outbound_stream_seq[stream_id] = uint16_add(stream_seq, 1)

    async def send(
        self: Any,
        stream_id: int,
        pp_id: int,
        user_data: bytes,
        expiry: float | None = None,
        max_retransmits: int | None = None,
        ordered: bool = True,
    ) -> None:
        enqueue(self, stream_id, pp_id, user_data, expiry, max_retransmits, ordered)
        transmit(self)

    transport_class.__init__ = init  # type: ignore[method-assign]
    transport_class._t3_restart = t3_restart  # type: ignore[method-assign]
    transport_class._t3_expired = t3_expired  # type: ignore[method-assign]
    transport_class._t3_cancel = t3_cancel  # type: ignore[method-assign]
    transport_class._update_rto = update_rto  # type: ignore[method-assign,assignment]
    transport_class._receive_chunk = receive_chunk  # type: ignore[method-assign]
    transport_class._handle_data = handle_data  # type: ignore[method-assign]
    transport_class._receive_data_chunk = receive_data_chunk  # type: ignore[method-assign]
    transport_class._receive_sack_chunk = receive_sack_chunk  # type: ignore[method-assign]
    transport_class._transmit = transmit_async  # type: ignore[method-assign]
    transport_class._send_chunk = send_chunk  # type: ignore[method-assign]
    transport_class._send_sack = send_sack  # type: ignore[method-assign]
    transport_class._send = send  # type: ignore[method-assign]
    transport_class._data_channel_flush = data_channel_flush  # type: ignore[method-assign]
    transport_class._data_channel_send = data_channel_send  # type: ignore[method-assign]


def _spawn(coroutine: Awaitable[Any]) -> None:
    task = asyncio.ensure_future(coroutine)
    _background.add(task)
    task.add_done_callback(_background.discard)


#: Receive buffer asked for on every ICE UDP socket (the kernel caps it at
#: net.core.rmem_max). Linux's default, about 208 KiB of accounted memory, holds
#: under a hundred 1.2 KB datagrams: a worker busy for a millisecond or two drops
#: a full congestion window's burst, and the sender falls back into recovery.
UDP_RECEIVE_BUFFER: Final = 4 * 1024 * 1024


def _tune_dtls_reads() -> None:
    """Skip aiortc's read of DTLS output after every datagram received when there is none.

    ``RTCDtlsTransport._write_ssl`` runs after each received record and reads
    OpenSSL's output BIO, which raises (and catches) an error when it is empty:
    the usual case once the handshake is done. The BIO's length says so first.
    """
    from aiortc.rtcdtlstransport import RTCDtlsTransport
    from OpenSSL.SSL import _ffi, _lib  # type: ignore[attr-defined]

    if not hasattr(_lib, "BIO_get_mem_data"):
        return
    stock = RTCDtlsTransport._write_ssl

    async def write_ssl(self: RTCDtlsTransport) -> None:
        bio = getattr(self._ssl, "_from_ssl", None)
        if bio is not None and _lib.BIO_get_mem_data(bio, _ffi.NULL) <= 0:
            return
        await stock(self)

    RTCDtlsTransport._write_ssl = write_ssl  # type: ignore[method-assign]


def _tune_udp() -> None:
    """A larger receive buffer, and DTLS datagrams past aioice's STUN parser.

    aioice parses every datagram as STUN first and hands it on when that raises;
    a DTLS record (first byte 20-63, RFC 7983 §7) never is STUN (0-3), so it goes
    straight to the connection.
    """
    stun_protocol = aioice.ice.StunProtocol
    stock_made = stun_protocol.connection_made
    stock_received = stun_protocol.datagram_received

    def connection_made(self: aioice.ice.StunProtocol, transport: asyncio.BaseTransport) -> None:
        stock_made(self, transport)
        # A relay's transport is aioice's TurnTransport, which has no socket of its own.
        extra = getattr(transport, "get_extra_info", None)
        sock = extra("socket") if extra is not None else None
        if sock is not None and hasattr(sock, "setsockopt"):  # uvloop gives a PseudoSocket
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)

    def datagram_received(self: aioice.ice.StunProtocol, data: Any, addr: Any) -> None:
        if data and 19 < data[0] < 64:
            self.receiver.data_received(data, self.local_candidate.component)
        else:
            stock_received(self, data, addr)

    stun_protocol.connection_made = connection_made  # type: ignore[method-assign]
    stun_protocol.datagram_received = datagram_received  # type: ignore[method-assign]


# --- remote mDNS candidates (browsers) ----------------------------------------

#: Seconds a remote mDNS candidate holds end-of-candidates back (aioice's
#: resolution timeout): the browser's own checks come well within it.
MDNS_GRACE: Final = 1.0


def _skip_mdns_resolution() -> None:
    """Never let a peer's ``.local`` candidate hold up the session.

    Browsers hide host addresses behind mDNS names (draft-ietf-mmusic-mdns-ice-
    candidates; Chromium's default). aioice resolves such a candidate inside
    ``add_remote_candidate``, waiting up to 1 s for an answer to a multicast
    query (none comes where multicast does not reach the browser: a container,
    another network, a firewall), and aiortc awaits it: once per candidate in
    ``addIceCandidate``, and before ICE even starts in ``setRemoteDescription``
    when the candidates are in the SDP. Measured with Chromium on loopback:
    1.05-1.12 s to open instead of 0.06-0.16 s.

    The name is not needed to connect: it only ever resolves on the browser's
    own link, where the browser's checks reach our host candidates and reveal
    its address as a peer-reflexive candidate (RFC 8445 section 7.3.1.3) --
    which is how such sessions connect anyway. So the name is not resolved
    (the draft lets an agent that does not resolve them ignore them), and no
    multicast query leaves the host on interfaces the ICE host allowlist
    excludes. What resolution gave besides is kept: the candidate holds
    end-of-candidates back for :data:`MDNS_GRACE` (aioice's resolution
    timeout), so ICE is not declared failed before the browser's first check
    could arrive. ``add_remote_candidate`` returns at once.
    """
    original = aioice.Connection.add_remote_candidate
    mdns_hostname = aioice.mdns.is_mdns_hostname

    async def add_remote_candidate(
        self: aioice.Connection, remote_candidate: aioice.Candidate | None
    ) -> None:
        if (
            remote_candidate is None
            or not mdns_hostname(remote_candidate.host)
            or self._closing
            or self._remote_candidates_end
        ):
            await original(self, remote_candidate)
            return
        log.debug("remote mDNS candidate %s: waiting for its checks instead", remote_candidate.host)
        # Counted now, so that an end-of-candidates arriving next waits for it.
        self._remote_candidates_resolving += 1
        task = asyncio.ensure_future(_hold_end_of_candidates(self))
        _background.add(task)
        task.add_done_callback(_background.discard)

    aioice.Connection.add_remote_candidate = add_remote_candidate  # type: ignore[method-assign]


async def _hold_end_of_candidates(connection: aioice.Connection) -> None:
    try:
        await asyncio.sleep(MDNS_GRACE)
    finally:
        connection._remote_candidates_resolving -= 1
        if (
            connection._remote_candidates_end
            and not connection._remote_candidates_resolving
            and not connection._closing
        ):
            connection._end_remote_candidates()
