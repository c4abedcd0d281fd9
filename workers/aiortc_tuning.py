"""Every change we make to aiortc's and aioice's behaviour, in one place.

aiortc and aioice offer no hooks for these, so :func:`apply` replaces a few of
their functions, once per process, and only for the versions listed in
:data:`VERIFIED` (read and tested against): with any other version, or with
``TUNNELCTL_STOCK_AIORTC=1`` in the environment, it changes nothing and logs
why, and tunnelctl runs on stock behaviour (slower to notice a dead path and
to connect, and without the reassembly bound). Every change keeps the wire
format standard, so a tuned peer talks to an untuned one (a browser, stock
aiortc) as before; the tests run a stock peer against a tuned one.

The changes:

* **Consent freshness in bounded time** (RFC 7675). aioice checks consent every
  5 s and gives up after 6 consecutive failures: a dead path is noticed after
  about 30 s. Here consent expires when no check has been answered for the
  connection's keepalive (:func:`set_keepalive`, default
  :data:`DEFAULT_KEEPALIVE`), checked five times per keepalive at randomised
  (0.8-1.2x) intervals as RFC 7675 section 5.1 randomises them. An expired
  connection is closed exactly as aioice closes it (the peer connection becomes
  ``failed``), and :func:`consent_expired` tells why. Consent checks are plain
  STUN Binding requests that every ICE agent answers, so a browser peer needs
  nothing: this is why we chose it over a keepalive frame of our own.
* **A check answered by the peer is retried at once** (RFC 8445 section
  7.3.1.4). Behind a NAT, the first check into the peer is usually dropped: the
  peer has not yet sent anything that opens its NAT. The peer's own check then
  arrives, and RFC 8445 says to replace our in-progress check with a triggered
  one; aioice instead waits for its fixed 500 ms retransmission timer. We
  retransmit the pending request when the peer's check arrives, which saves
  those 500 ms on every NATed connect.
* **A bounded STUN lookup.** aioice waits up to 5 s for server-reflexive
  candidates; a STUN server that cannot be reached (UDP blocked, path down)
  then delays every offer by 5 s. Real STUN round trips are far below
  :data:`STUN_TIMEOUT`, after which the lookup is dropped (host and relay
  candidates are unaffected).
* **A bound on DataChannel message reassembly**: see
  :func:`_bound_message_reassembly`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import Awaitable, Callable
from typing import Any

import aioice
import aioice.ice
import aioice.stun
import aiortc
from aiortc import RTCPeerConnection

from protocol.ice import DEFAULT_KEEPALIVE

log = logging.getLogger("tunnelctl.tuning")

#: (aioice, aiortc) versions these changes were read against and are tested with.
VERIFIED = {("0.13.0", "1.16.0")}
#: The environment variable that keeps aiortc/aioice stock (tests, comparisons).
STOCK_ENV = "TUNNELCTL_STOCK_AIORTC"

#: Consent checks per keepalive period: four can be lost in a row before the
#: fifth's answer is late, which keeps 5 % random loss (one chance in 160,000
#: per period) from ever ending a live session.
CHECKS_PER_KEEPALIVE = 5
#: How long a consent check's answer may take (one retransmission at 0.5 s).
CONSENT_RETRANSMISSIONS = 1
#: Seconds a STUN lookup may take before gathering goes on without it.
STUN_TIMEOUT = 1.0
#: The most one DataChannel message may grow to while being reassembled before
#: the session is ended. Our messages are at most 64 KiB (PROTOCOL.md §2.1) and
#: aiortc advertises 256 KiB; the slack covers a lost first fragment or two.
MESSAGE_REASSEMBLY_LIMIT = 1024 * 1024

_applied: bool | None = None
_background: set[asyncio.Future[Any]] = set()


def apply() -> bool:
    """Apply every change, once per process; return whether aiortc/aioice are tuned."""
    global _applied
    if _applied is not None:
        return _applied
    versions = (aioice.__version__, aiortc.__version__)
    if os.environ.get(STOCK_ENV) == "1":
        log.info("aiortc/aioice left stock (%s=1)", STOCK_ENV)
        _applied = False
    elif versions not in VERIFIED:
        log.warning(
            "aioice %s / aiortc %s are not the versions tunnelctl's tuning was verified "
            "with; running them stock (slower dead-path detection and connects)",
            *versions,
        )
        _applied = False
    else:
        _bound_message_reassembly()
        _bound_consent()
        _retry_checks_answered_by_peer()
        _bound_stun_lookup()
        _applied = True
    return _applied


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


# -- consent freshness (RFC 7675) -------------------------------------------------------


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
            with contextlib.suppress(aioice.stun.TransactionError):
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
        await self.close()

    aioice.Connection.query_consent = query_consent  # type: ignore[method-assign]


# -- triggered checks (RFC 8445 section 7.3.1.4) ----------------------------------------


def _retry_checks_answered_by_peer() -> None:
    original = aioice.Connection.check_incoming
    in_progress = aioice.ice.CandidatePair.State.IN_PROGRESS

    def check_incoming(
        self: aioice.Connection,
        message: aioice.stun.Message,
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


# -- the STUN lookup -------------------------------------------------------------------


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


# -- DataChannel message reassembly ------------------------------------------------------


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
