"""The signaling server: a thin websockets adapter around :class:`~signaling.router.Router`.

Speaks PROTOCOL.md §1 over WebSocket (RFC 6455) at ``ws://HOST:PORT/signal``;
plain HTTP requests on the same port get the browser client (:mod:`signaling.web`).
This module does only I/O: HTTP path check, authentication (§1.2, via
:mod:`signaling.auth`), and carrying out the router's actions. All routing
rules live in the router.

Public API:

``SignalingServer(secret, host="127.0.0.1", port=8000, limits=None, *, auth_timeout=10.0,
max_outbox=1 << 20, ice=None, caps=None)``
    ``await start()`` binds (``port=0`` picks a free port; ``.port`` and
    ``.url`` are then the real ones), ``await close()`` closes every connection
    with 1001 and waits for the handlers. Also an async context manager.
    ``stats()`` returns the router's counters. Raises
    :class:`~signaling.errors.ServerConfigError` for a weak secret or an address it
    cannot listen on.
``run_server(secret, host="127.0.0.1", port=8000, on_ready=None, *, limits=None, ice=None,
caps=None)``
    Serve until cancelled, SIGTERM or SIGINT, then close cleanly.
    ``on_ready(url)`` is called once listening.

With ``ice`` (a :class:`~signaling.turn.IceIssuer`), every authenticated peer
gets an ``ice_servers`` message before ``welcome`` (so it holds them before it
can ask for a session) and a fresh one every half credential lifetime.

Robustness: frames over 65 536 bytes close the connection with 1009 (done by
websockets, ``max_size``); any other bad input gets an ``error`` reply. Each
connection has its own outbox drained by its own task, so a peer that does not
read stalls only itself: once ``max_outbox`` characters (1 MiB) are queued
for it, it is closed with 1008.
Tokens are never logged: neither ours nor websockets' debug lines (redacted).

Connection caps (:class:`ConnectionCaps`, README "Security"), counted from the
moment a TCP connection is accepted: at most ``total`` connections (and never
more than the file-descriptor limit leaves room for, so running out of
descriptors is not how the server learns it is full); at most
``unauthenticated`` not yet authenticated, each for at most ``auth_timeout``
seconds from its accept, and when they are all taken the oldest is dropped
for the newcomer, the oldest of those that have not sent their HTTP request
yet if any (a flood of idle sockets cannot keep a real login out: it sends
its request at once and authenticates in milliseconds); at most ``per_identity`` authenticated
connections of one token ``sub`` (more are closed with 4503). Lines that
remote input causes (failed authentication, refused connections, closes for
abuse) are rate-limited (:class:`~aio.logs.LogThrottle`).

Expiry and revocation (PROTOCOL.md §1.2): a link is closed with 4401 ``token
expired`` when its token's ``exp`` (plus the 30 s leeway) passes, and devices
end the sessions of a client whose link that was (``revoke``). The revocation
file (``revoked=PATH``; lines ``sub ID`` or ``jti ID``, ``#`` comments) is read
at start and again by :meth:`SignalingServer.reload_revocations` (SIGHUP in
:func:`run_server`): a revoked token is refused at authentication, links that
used one are closed at once (4401 ``token revoked``) and devices told to end
the sessions of the clients concerned.

Several nodes (PROTOCOL.md §1.8): with ``cluster`` (a
:class:`~signaling.cluster.RedisCluster`) the router's relays and presence go
through Redis to the other nodes. :meth:`SignalingServer.drain` (SIGTERM in
:func:`run_server`) stops accepting, sends every connection ``moving`` and
waits ``drain_timeout`` for them to go before closing the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import http
import itertools
import logging
import os
import resource
import signal
import sys
import termios
import time
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from aio.logs import LogThrottle, RedactSecrets
from aio.metrics_http import MetricsEndpoint, MetricsListenError
from protocol.errors import SignalingError
from protocol.signaling import (
    MAX_FRAME_SIZE,
    Auth,
    CloseCode,
    Error,
    ErrorCode,
    Moving,
    Registered,
    decode_signaling,
    encode_signaling,
)
from signaling import web
from signaling.auth import LEEWAY, Identity, check_secret, verify_token
from signaling.cluster import RedisCluster
from signaling.errors import AuthError, ServerConfigError, UsageError
from signaling.metrics import SignalingMetrics
from signaling.router import Action, Limits, Presence, Relay, Router, Send
from signaling.turn import IceIssuer

__all__ = ["AUTH_TIMEOUT", "SIGNAL_PATH", "ConnectionCaps", "SignalingServer", "run_server"]

SIGNAL_PATH: Final = "/signal"
AUTH_TIMEOUT: Final = 10.0
#: Text queued for one connection beyond which it is considered not reading.
MAX_OUTBOX_CHARS: Final = 1 << 20
#: RFC 6455 §5.5: a close frame's reason fits in 123 bytes.
_MAX_CLOSE_REASON: Final = 123

log = logging.getLogger("tunnelctl.signal")

#: File descriptors kept free of connections: asyncio accepts up to its backlog
#: (100) sockets before our code sees the first, plus the listening sockets,
#: the event loop's and logging's own.
FD_RESERVE: Final = 160


@dataclass(frozen=True, slots=True)
class ConnectionCaps:
    """How many connections the server holds (module docstring; README "Security").

    Measured: about 60 KB of server memory per idle authenticated connection
    (websockets' own state is ~50 KB of it), so the defaults bound connection
    memory to about 60 MB above the ~40 MB the server starts with.
    """

    total: int = 1024
    unauthenticated: int = 128
    per_identity: int = 8

    def __post_init__(self) -> None:
        for name in ("total", "unauthenticated", "per_identity"):
            if getattr(self, name) < 1:
                raise ServerConfigError(f"{name} connections must be at least 1")


# websockets logs through this child; its INFO lines ("connection open") would
# duplicate ours, so it is quiet unless someone lowers its level to debug.
_wire_log = logging.getLogger("tunnelctl.signal.websockets")
_wire_log.setLevel(logging.WARNING)
_wire_log.addFilter(RedactSecrets())


def _clip_reason(reason: str) -> str:
    raw = reason.encode("utf-8")
    if len(raw) <= _MAX_CLOSE_REASON:
        return reason
    return raw[: _MAX_CLOSE_REASON - 3].decode("utf-8", "ignore") + "..."


def _peer_name(ws: ServerConnection) -> str:
    address = ws.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


def _has_spoken(ws: ServerConnection) -> bool:
    """Whether ``ws`` sent anything: its HTTP request was read, or bytes of it
    wait in the kernel (the event loop may not have read them yet in a flood)."""
    if ws.request is not None:
        return True
    sock = ws.transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        pending = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return False
    return int.from_bytes(pending, sys.byteorder) > 0


def _close_code(ws: ServerConnection) -> int:
    """The code of whichever side closed first (``close_code`` only has the peer's)."""
    protocol = ws.protocol
    received, sent = protocol.close_rcvd, protocol.close_sent
    if received is not None and (sent is None or protocol.close_rcvd_then_sent):
        return received.code
    if sent is not None:
        return sent.code
    return 1006  # RFC 6455 §7.1.5: closed without a close frame


#: Why authentication failed, as counted (``auth_failures.<kind>``): a fixed set.
AUTH_FAILURE_KINDS: Final = ("invalid_token", "expired", "revoked", "timeout", "no_auth")


class _AuthFailed(Exception):
    """Authentication did not succeed; ``reason`` becomes the 4401 close reason,
    ``kind`` (one of :data:`AUTH_FAILURE_KINDS`) what is counted."""

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


@dataclass(frozen=True, slots=True)
class _CloseRequest:
    code: int
    reason: str


class _Outbox:
    """Messages for one connection, written by one task in order.

    Routing never awaits a socket: a slow reader must not stall the handler of
    the peer that sent it something.
    """

    def __init__(self, ws: ServerConnection, conn_id: int, limit: int) -> None:
        self._ws = ws
        self._conn_id = conn_id
        self._limit = limit
        self._queue: asyncio.Queue[str | _CloseRequest] = asyncio.Queue()
        self._queued_chars = 0
        self._closing = False
        self._task = asyncio.create_task(self._run(), name=f"signal-outbox-{conn_id}")
        self._overflow_close: asyncio.Task[None] | None = None

    def send(self, text: str) -> None:
        if self._closing:
            return
        if self._queued_chars + len(text) > self._limit:
            self._closing = True
            log.warning("conn %d: not reading its messages, closing it", self._conn_id)
            # The writer is stuck in send(); close() bounds the wait by
            # close_timeout and then aborts the TCP connection.
            self._overflow_close = asyncio.create_task(
                self._ws.close(1008, "too many unread messages")
            )
            return
        self._queued_chars += len(text)
        self._queue.put_nowait(text)

    def close(self, code: int, reason: str) -> None:
        if not self._closing:
            self._closing = True
            self._queue.put_nowait(_CloseRequest(code, _clip_reason(reason)))

    async def stop(self) -> None:
        """Stop writing; the connection is closed, whatever is queued is moot."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, _CloseRequest):
                    await self._ws.close(item.code, item.reason)
                    return
                self._queued_chars -= len(item)
                await self._ws.send(item)
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("conn %d: outbox writer failed", self._conn_id)
            self._ws.transport.abort()


class SignalingServer:
    """The §1 signaling server on one listening address. See the module docstring."""

    def __init__(
        self,
        secret: str,
        host: str = "127.0.0.1",
        port: int = 8000,
        limits: Limits | None = None,
        *,
        auth_timeout: float = AUTH_TIMEOUT,
        max_outbox: int = MAX_OUTBOX_CHARS,
        ice: IceIssuer | None = None,
        caps: ConnectionCaps | None = None,
        revoked: str | os.PathLike[str] | None = None,
        cluster: RedisCluster | None = None,
    ) -> None:
        check_secret(secret)
        self._revoked_path = revoked
        self._revoked_subs: frozenset[str] = frozenset()
        self._revoked_jtis: frozenset[str] = frozenset()
        if revoked is not None:
            self._revoked_subs, self._revoked_jtis = _read_revocations(revoked)
        self.caps = caps if caps is not None else ConnectionCaps()
        self._ice = ice
        if auth_timeout <= 0:
            raise ServerConfigError("auth_timeout must be positive")
        if max_outbox < MAX_FRAME_SIZE:
            raise ServerConfigError(f"max_outbox must be at least {MAX_FRAME_SIZE}")
        self._max_outbox = max_outbox
        self._secret = secret
        self._host = host
        self._port = port
        self._auth_timeout = auth_timeout
        self._router = Router(limits)
        self._server: Server | None = None
        self._outboxes: dict[Hashable, _Outbox] = {}
        self._auth_failures: Counter[str] = Counter()
        self._conn_ids = itertools.count(1)
        self._tcp: set[ServerConnection] = set()
        # Insertion-ordered: the oldest unauthenticated connection goes first.
        self._unauthenticated: dict[ServerConnection, float] = {}
        self._identities: Counter[str] = Counter()
        self._refused: Counter[str] = Counter()
        self._max_total = self.caps.total
        self._throttle = LogThrottle(log)
        self._cluster = cluster
        if cluster is not None:
            cluster.attach(self._router, self._apply)
        #: Its Prometheus registry (:mod:`signaling.metrics`), served by ``run_server``.
        self.metrics = SignalingMetrics(self.stats)

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The listening port: the real one once :meth:`start` has returned."""
        return self._port

    @property
    def url(self) -> str:
        """``ws://HOST:PORT/signal``, what clients and devices connect to."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"ws://{host}:{self._port}{SIGNAL_PATH}"

    def stats(self) -> dict[str, int]:
        """``auth_failures`` (and ``auth_failures.<kind>``, :data:`AUTH_FAILURE_KINDS`),
        ``tcp_connections``, ``unauthenticated``, ``refused.<why>`` and the
        router's gauges and counters (see :meth:`Router.stats`)."""
        return {
            "auth_failures": self._auth_failures.total(),
            **{f"auth_failures.{kind}": self._auth_failures[kind] for kind in AUTH_FAILURE_KINDS},
            "tcp_connections": len(self._tcp),
            "unauthenticated": len(self._unauthenticated),
            **{f"refused.{why}": n for why, n in self._refused.items()},
            **self._router.stats(),
            **(self._cluster.stats() if self._cluster is not None else {}),
        }

    async def start(self) -> None:
        """Listen. Raises :class:`ServerConfigError` if the address cannot be used."""
        if self._server is not None:
            raise UsageError("server already started")
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        room = soft - FD_RESERVE if soft != resource.RLIM_INFINITY else self.caps.total
        if room < 1:
            raise ServerConfigError(
                f"the file descriptor limit ({soft}) leaves no room for connections; "
                f"raise it (ulimit -n) above {FD_RESERVE}"
            )
        self._max_total = min(self.caps.total, room)
        if self._cluster is not None:
            await self._cluster.start()
        try:
            self._server = await serve(
                self._handle,
                self._host,
                self._port,
                process_request=self._check_path,
                max_size=MAX_FRAME_SIZE,
                logger=_wire_log,
                open_timeout=self._auth_timeout,
                create_connection=self._connection_class(),
            )
        except OSError as exc:
            raise ServerConfigError(
                f"cannot listen on {self._host}:{self._port}: {exc.strerror or exc}"
            ) from None
        self._port = self._server.sockets[0].getsockname()[1]
        log.info("listening on %s", self.url)
        log.info(
            "connection caps: %d in all%s, %d unauthenticated for at most %g s, %d per identity",
            self._max_total,
            f" (file descriptor limit {soft})" if self._max_total < self.caps.total else "",
            self.caps.unauthenticated,
            self._auth_timeout,
            self.caps.per_identity,
        )

    async def close(self) -> None:
        """Stop listening, close all connections with 1001, wait for handlers."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close(code=CloseCode.GOING_AWAY, reason="server shutting down")
        await server.wait_closed()
        if self._cluster is not None:
            await self._cluster.close()
        log.info("closed")

    async def drain(self, timeout: float) -> None:
        """Stop accepting, tell every connection to move to another node
        (``moving``), wait up to ``timeout`` s for them to go, then :meth:`close`."""
        if self._server is None:
            return
        self._server.close(close_connections=False)
        log.info("draining %d connections (at most %g s)", len(self._outboxes), timeout)
        moving = encode_signaling(Moving("node draining"))
        for outbox in self._outboxes.values():
            outbox.send(moving)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), timeout)
        if self._outboxes:
            # The listening side is closed already: close() would not close these.
            log.info("drain timed out; closing %d connections", len(self._outboxes))
            for outbox in self._outboxes.values():
                outbox.close(CloseCode.GOING_AWAY, "server shutting down")
        await self.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def reload_revocations(self) -> None:
        """Read the revocation file again; act on what it newly revokes, at once.

        A file that cannot be read or parsed is logged and the previous list kept.
        """
        if self._revoked_path is None:
            return
        try:
            subs, jtis = _read_revocations(self._revoked_path)
        except ServerConfigError as exc:
            log.error("revocations not reloaded (the previous list holds): %s", exc)
            return
        new_subs, new_jtis = subs - self._revoked_subs, jtis - self._revoked_jtis
        self._revoked_subs, self._revoked_jtis = subs, jtis
        log.info(
            "revocations reloaded: %d identities, %d tokens (%d and %d new)",
            len(subs),
            len(jtis),
            len(new_subs),
            len(new_jtis),
        )
        for sub in sorted(new_subs):
            self._apply(self._router.revoke(sub=sub, reason="token revoked"))
        for jti in sorted(new_jtis):
            self._apply(self._router.revoke(jti=jti, reason="token revoked"))

    # --- connection handling ---------------------------------------------------

    def _connection_class(self) -> type[ServerConnection]:
        server = self

        class CountedConnection(ServerConnection):
            """Counted from its accept, before a byte of it is read."""

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                server._accepted(self)

            def connection_lost(self, exc: Exception | None) -> None:
                server._tcp.discard(self)
                server._unauthenticated.pop(self, None)
                super().connection_lost(exc)

        return CountedConnection

    def _accepted(self, ws: ServerConnection) -> None:
        if len(self._unauthenticated) >= self.caps.unauthenticated:
            self._evict_oldest("unauthenticated")
        if len(self._tcp) >= self._max_total:
            if not self._unauthenticated:
                self._refuse(ws, "total", f"{self._max_total} connections")
                return
            self._evict_oldest("total")
        self._tcp.add(ws)
        self._unauthenticated[ws] = asyncio.get_running_loop().time()

    def _evict_oldest(self, cap: str) -> None:
        # Silent sockets first: a real client sends its HTTP request the moment
        # it connects, so a flood of idle sockets only ever evicts itself.
        oldest = next(
            (ws for ws in self._unauthenticated if not _has_spoken(ws)),
            next(iter(self._unauthenticated)),
        )
        self._unauthenticated.pop(oldest)
        self._tcp.discard(oldest)
        self._refused[f"evicted_{cap}"] += 1
        self._throttle.warning(
            "evicted",
            "dropped the oldest unauthenticated connection, from %s: at the cap of %s",
            _peer_name(oldest),
            f"{self.caps.unauthenticated} unauthenticated"
            if cap == "unauthenticated"
            else f"{self._max_total} connections",
        )
        oldest.transport.abort()

    def _refuse(self, ws: ServerConnection, cap: str, what: str) -> None:
        self._refused[cap] += 1
        self._throttle.warning("refused", "refused a connection from %s: %s", _peer_name(ws), what)
        ws.transport.abort()

    def _check_path(self, ws: ServerConnection, request: Request) -> Response | None:
        if urlsplit(request.path).path != SIGNAL_PATH:
            if request.headers.get("Upgrade", "").lower() != "websocket":
                return web.respond(request)  # the browser client's pages (signaling/web.py)
            return ws.respond(http.HTTPStatus.NOT_FOUND, f"Not Found: use {SIGNAL_PATH}\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        conn_id = next(self._conn_ids)
        peer = _peer_name(ws)
        try:
            identity = await self._authenticate(ws)
        except _AuthFailed as exc:
            self._auth_failures[exc.kind] += 1
            self._throttle.warning(
                "auth", "conn %d from %s: authentication failed: %s", conn_id, peer, exc.reason
            )
            await ws.close(CloseCode.AUTH_FAILED, _clip_reason(exc.reason))
            return
        except ConnectionClosed:
            self._throttle.info(
                "unauthenticated", "conn %d from %s: closed before authenticating", conn_id, peer
            )
            return
        if self._unauthenticated.pop(ws, None) is None:
            return  # evicted while its token was being checked
        if self._identities[identity.sub] >= self.caps.per_identity:
            self._refused["per_identity"] += 1
            self._throttle.warning(
                "per_identity",
                "conn %d from %s: refused, %s %s already has %d connections",
                conn_id,
                peer,
                identity.role,
                identity.sub,
                self.caps.per_identity,
            )
            await ws.close(CloseCode.TOO_MANY_CONNECTIONS, "too many connections for this identity")
            return
        self._identities[identity.sub] += 1
        try:
            await self._serve(ws, conn_id, peer, identity)
        finally:
            self._identities[identity.sub] -= 1
            if not self._identities[identity.sub]:
                del self._identities[identity.sub]

    async def _serve(
        self, ws: ServerConnection, conn_id: int, peer: str, identity: Identity
    ) -> None:

        loop = asyncio.get_running_loop()
        outbox = _Outbox(ws, conn_id, self._max_outbox)
        # The leeway that let a just-expired token in also bounds how long it lasts.
        lifetime = identity.expires + LEEWAY - time.time()
        expiry = loop.call_later(
            max(0.0, min(lifetime, 10 * 365 * 86400.0)),
            lambda: self._apply(self._router.expire(conn_id, "token expired")),
        )
        self._outboxes[conn_id] = outbox
        log.info("conn %d from %s: connected as %s %s", conn_id, peer, identity.role, identity.sub)
        refresh: asyncio.Task[None] | None = None
        if self._ice is not None:
            outbox.send(encode_signaling(self._ice.issue(identity.sub, time.time())))
            if self._ice.refresh_interval is not None:
                refresh = asyncio.create_task(
                    self._refresh_ice(outbox, identity.sub, self._ice.refresh_interval)
                )
        try:
            self._apply(self._router.connect(conn_id, identity, loop.time()))
            async for data in ws:
                try:
                    actions = self._router.receive(conn_id, data, loop.time())
                except Exception:
                    # A bug in routing must cost one message, not the server.
                    log.exception("conn %d: error routing a message", conn_id)
                    continue
                self._apply(actions)
        except ConnectionClosed:
            pass  # e.g. 1009 for an oversized frame, or the peer vanished
        finally:
            expiry.cancel()
            if refresh is not None:
                refresh.cancel()
            del self._outboxes[conn_id]
            self._apply(self._router.disconnect(conn_id))
            await outbox.stop()
            log.info(
                "conn %d: disconnected %s %s (close %s)",
                conn_id,
                identity.role,
                identity.sub,
                _close_code(ws),
            )

    async def _refresh_ice(self, outbox: _Outbox, sub: str, interval: float) -> None:
        """Fresh TURN credentials while the old ones still have half their life left."""
        assert self._ice is not None
        while True:
            await asyncio.sleep(interval)
            outbox.send(encode_signaling(self._ice.issue(sub, time.time())))

    async def _authenticate(self, ws: ServerConnection) -> Identity:
        """The identity of ``ws`` from ``?token=`` or a first ``auth`` message (§1.2)."""
        assert ws.request is not None  # the handler only runs after the handshake
        tokens = parse_qs(urlsplit(ws.request.path).query, keep_blank_values=True).get("token")
        if tokens is not None:
            if len(tokens) != 1:
                raise _AuthFailed("invalid token: more than one token parameter", "invalid_token")
            token = tokens[0]
        else:
            token = await self._receive_auth(ws)
        try:
            identity = verify_token(self._secret, token)
        except AuthError as exc:
            kind = "expired" if exc.reason == "expired" else "invalid_token"
            raise _AuthFailed(f"invalid token: {exc.reason}", kind) from None
        if identity.sub in self._revoked_subs or identity.jti in self._revoked_jtis:
            raise _AuthFailed("invalid token: revoked", "revoked")
        return identity

    async def _receive_auth(self, ws: ServerConnection) -> str:
        accepted = self._unauthenticated.get(ws)
        loop = asyncio.get_running_loop()
        # The time to authenticate counts from the accept, handshake included.
        deadline = (accepted if accepted is not None else loop.time()) + self._auth_timeout
        try:
            async with asyncio.timeout_at(deadline):
                data = await ws.recv()
        except TimeoutError:
            raise _AuthFailed("authentication timed out", "timeout") from None
        try:
            msg = decode_signaling(data)
        except SignalingError as exc:
            await ws.send(encode_signaling(Error(exc.code, exc.message)))
            raise _AuthFailed(f"not authenticated: {exc.code}", "no_auth") from None
        if not isinstance(msg, Auth):
            notice = Error(
                ErrorCode.NOT_AUTHENTICATED,
                "authenticate first: connect with ?token=JWT or send an auth message",
            )
            await ws.send(encode_signaling(notice))
            raise _AuthFailed("not authenticated: first message must be auth", "no_auth")
        return msg.token

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Relay | Presence):
                if self._cluster is not None:
                    self._cluster.handle(action)
                continue
            outbox = self._outboxes.get(action.conn)
            if outbox is None:
                continue  # that connection is already gone
            if isinstance(action, Send):
                if isinstance(action.message, Registered):
                    log.info("conn %s: device %s registered", action.conn, action.message.device)
                outbox.send(encode_signaling(action.message))
            else:
                self._throttle.info(
                    f"close {action.code}",
                    "conn %s: closing with %d (%s)",
                    action.conn,
                    action.code,
                    action.reason,
                )
                outbox.close(action.code, action.reason)


async def run_server(
    secret: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    on_ready: Callable[[str], None] | None = None,
    *,
    limits: Limits | None = None,
    ice: IceIssuer | None = None,
    caps: ConnectionCaps | None = None,
    auth_timeout: float = AUTH_TIMEOUT,
    revoked: str | os.PathLike[str] | None = None,
    cluster: RedisCluster | None = None,
    drain_timeout: float = 10.0,
    metrics: tuple[str, int] | None = None,
    on_metrics: Callable[[str], None] | None = None,
) -> None:
    """Serve until this task is cancelled or the process gets SIGTERM/SIGINT.

    SIGTERM drains (:meth:`SignalingServer.drain`, at most ``drain_timeout``
    seconds); SIGINT and cancellation close at once.

    ``on_ready(url)`` is called once the server listens (``port=0`` picks a
    free port; ``url`` has the real one). With ``metrics`` (host, port), its
    Prometheus metrics are served there too, and ``on_metrics(url)`` is called
    with their ``http://HOST:PORT/metrics``. On the way out every connection is
    closed with 1001. Raises :class:`ServerConfigError` as :class:`SignalingServer`
    does, and when the metrics address cannot be listened on.
    """
    server = SignalingServer(
        secret,
        host,
        port,
        limits,
        ice=ice,
        caps=caps,
        auth_timeout=auth_timeout,
        revoked=revoked,
        cluster=cluster,
    )
    endpoint = None
    if metrics is not None:
        endpoint = MetricsEndpoint(server.metrics.registry, *metrics)
        try:
            await endpoint.start()
        except MetricsListenError as exc:
            raise ServerConfigError(str(exc)) from None
    try:
        await server.start()
    except BaseException:
        if endpoint is not None:
            await endpoint.close()
        raise
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[signal.Signals] = []
    handled: list[signal.Signals] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, _on_signal, signum, received, stop)
        except (NotImplementedError, RuntimeError, ValueError):
            continue  # not the main thread, or not a Unix loop: cancellation still works
        handled.append(signum)
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGHUP, server.reload_revocations)
        handled.append(signal.SIGHUP)
    try:
        if on_ready is not None:
            on_ready(server.url)
        if endpoint is not None and on_metrics is not None:
            on_metrics(endpoint.url)
        await stop.wait()
        log.info("signal received, shutting down")
        if received[:1] == [signal.SIGTERM]:
            await server.drain(drain_timeout)
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
        await server.close()
        if endpoint is not None:
            await endpoint.close()


def _on_signal(signum: signal.Signals, received: list[signal.Signals], stop: asyncio.Event) -> None:
    received.append(signum)
    stop.set()


def _read_revocations(path: str | os.PathLike[str]) -> tuple[frozenset[str], frozenset[str]]:
    """The revoked identities and token ids of a revocation file (module docstring)."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read(1 << 20)
    except (OSError, UnicodeDecodeError) as exc:
        raise ServerConfigError(f"cannot read revocation file {path}: {exc}") from None
    subs: set[str] = set()
    jtis: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, value = line.partition(" ")
        value = value.strip()
        if kind not in ("sub", "jti") or not value or " " in value:
            raise ServerConfigError(
                f"revocation file {path}, line {number}: expected 'sub ID' or 'jti ID'"
            )
        (subs if kind == "sub" else jtis).add(value)
    return frozenset(subs), frozenset(jtis)
