"""HTTP streams over the tunnel, both ends: PROTOCOL.md §2.8, HTTP/1.1 (RFC 9112) with h11.

:class:`HttpStreams` serves the HTTP streams of one :class:`~workers.bridge.TunnelBridge`
(the bridge hands it every event of an HTTP stream):

* **device side**: each HTTP stream's request is performed against its
  service's configured address, and only there, with h11 over a keep-alive
  connection taken from a per-service pool (:class:`ConnectionPool`). The
  request's hop-by-hop fields are dropped and ``Host`` is the service's
  ``HOST:PORT``; the response head goes back as HEAD, the body as it arrives
  (never buffered whole: server-sent events leave one by one), the end as FIN.
  After a ``101 Switching Protocols`` the stream carries raw bytes both ways.
* **client side**: :meth:`HttpStreams.open` starts a request and returns an
  :class:`HttpExchange` (write the body, read the response), for Python
  callers and tests; browsers speak the same frames themselves.

Backpressure, as for raw streams (``workers/bridge.py``): a body chunk received
is acknowledged (credit returned) only once it is written to the service's
socket, or read by the :class:`HttpExchange`'s caller; the service's socket is
not read while more than ``STREAM_SEND_HIGH`` bytes of the stream wait in the
multiplexer. So a stream holds about one window each way, whatever the size of
the bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

import h11

from protocol.errors import LocalProtocolError
from protocol.frames import ResetCode
from protocol.http_heads import (
    RequestHead,
    ResponseHead,
    end_to_end_fields,
    field_values,
    is_upgrade_request,
)
from protocol.mux import (
    DataReceived,
    Event,
    HeadReceived,
    HttpStreamOpened,
    Multiplexer,
    StreamEnded,
    StreamReset,
    StreamState,
)
from workers.errors import HttpStreamReset, TunnelUsageError

log = logging.getLogger("tunnelctl.http")

READ_SIZE: Final = 64 * 1024
STREAM_SEND_HIGH: Final = 256 * 1024
#: Idle keep-alive connections kept per service, and how long each may idle.
MAX_IDLE_PER_SERVICE: Final = 8
IDLE_TIMEOUT: Final = 30.0
#: The service's response head may be this large (h11 refuses larger).
MAX_RESPONSE_HEAD: Final = 16 * 1024
#: Seconds a complete response waits for the end of its request's upload
#: before the connection is given up instead of kept alive.
UPLOAD_GRACE: Final = 5.0
#: Request fields the device replaces or never forwards (besides the hop-by-hop ones).
_DROP: Final = frozenset({b"host", b"expect"})


@dataclass(frozen=True, slots=True)
class Upstream:
    """A service's address, as HTTP streams reach it."""

    host: str
    port: int

    @property
    def host_header(self) -> bytes:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}".encode("ascii")


OpenConnection = Callable[[Upstream], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
#: Decides whether a stream may reach ``service``: its address, or ``None`` once
#: the stream has been reset (unknown service, shutting down).
Admit = Callable[[int, str], Upstream | None]


class ByteCounters(Protocol):
    """Where the session counts a service's bytes (the bridge's stats of that service)."""

    bytes_in: int  # tunnel -> local side
    bytes_out: int  # local side -> tunnel


@dataclass(slots=True)
class _Uncounted:
    bytes_in: int = 0
    bytes_out: int = 0


class _Abort(Exception):
    """End the exchange with RESET ``code``."""

    def __init__(self, code: ResetCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(eq=False)
class _Connection:
    """One TCP connection to a service, with its h11 state."""

    upstream: Upstream
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    h11: h11.Connection = field(
        default_factory=lambda: h11.Connection(
            h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD
        )
    )
    reused: bool = False
    watcher: asyncio.Task[None] | None = None
    retired: bool = False  # the idle watcher saw it close, talk, or time out

    def abort(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
        self.writer.transport.abort()


class ConnectionPool:
    """Keep-alive connections per service: at most ``max_idle`` idle ones each,
    each closed after ``idle_timeout`` seconds or as soon as the service closes it."""

    def __init__(
        self,
        open_connection: OpenConnection,
        *,
        max_idle: int = MAX_IDLE_PER_SERVICE,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self._open_connection = open_connection
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._idle: dict[Upstream, list[_Connection]] = {}
        self.opened = 0  # connections made, for tests and stats

    def idle_count(self, upstream: Upstream) -> int:
        return len(self._idle.get(upstream, ()))

    async def acquire(self, upstream: Upstream, *, fresh: bool = False) -> _Connection:
        """An idle connection to ``upstream`` (the most recent), or a new one.
        Raises ``OSError``/``TimeoutError`` if connecting fails."""
        idle = self._idle.get(upstream)
        while idle and not fresh:
            conn = idle.pop()
            watcher, conn.watcher = conn.watcher, None
            assert watcher is not None
            watcher.cancel()
            # Until the watcher has run its cancellation, its read() still waits
            # on the reader, and a second reader is an error.
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            if not conn.retired and not conn.reader.at_eof() and not conn.writer.is_closing():
                conn.reused = True
                return conn
            conn.abort()
        reader, writer = await self._open_connection(upstream)
        self.opened += 1
        return _Connection(upstream, reader, writer)

    def release(self, conn: _Connection) -> None:
        """Give back a connection whose exchange completed cleanly (h11 cycled)."""
        idle = self._idle.setdefault(conn.upstream, [])
        if len(idle) >= self._max_idle:
            conn.abort()
            return
        idle.append(conn)
        conn.watcher = asyncio.get_running_loop().create_task(self._watch(conn))

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.abort()
        self._idle.clear()

    async def _watch(self, conn: _Connection) -> None:
        # An idle connection must stay silent: EOF (the service closed it), bytes
        # nobody asked for, or the idle timeout all retire it.
        with contextlib.suppress(TimeoutError, ConnectionError, OSError):
            await asyncio.wait_for(conn.reader.read(1), self._idle_timeout)
        conn.retired = True
        idle = self._idle.get(conn.upstream, [])
        if conn in idle:
            idle.remove(conn)
            conn.writer.transport.abort()


@dataclass(eq=False)
class _Exchange:
    """What both ends keep per HTTP stream."""

    stream_id: int
    room: asyncio.Event = field(default_factory=asyncio.Event)  # send room (flush)
    remote_fin: bool = False
    dead: bool = False
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    # Its service's counters, set when it opens (HttpStreams' ``stats``).
    stats: ByteCounters = field(default_factory=_Uncounted)


class HttpExchange(_Exchange):
    """The client's side of one HTTP stream: a request going out, a response coming in."""

    def __init__(self, streams: HttpStreams, stream_id: int) -> None:
        super().__init__(stream_id)
        self._streams = streams
        self._head: asyncio.Future[ResponseHead] = asyncio.get_running_loop().create_future()
        self._chunks: deque[bytes] = deque()
        self._readable = asyncio.Event()
        self._error: HttpStreamReset | None = None
        self._ended = False

    async def response(self) -> ResponseHead:
        """The response head; raises :class:`HttpStreamReset` if the stream was reset first."""
        return await asyncio.shield(self._head)

    async def read(self) -> bytes:
        """The next piece of the response body; ``b""`` at its end (FIN). Each
        piece read returns its credit to the device: an unread body holds the
        device back, not memory here. Raises :class:`HttpStreamReset`."""
        while not self._chunks:
            if self.remote_fin:
                return b""
            if self._error is not None:
                raise self._error
            self._readable.clear()
            await self._readable.wait()
        chunk = self._chunks.popleft()
        self._streams.acknowledge(self, len(chunk))
        return chunk

    async def read_all(self) -> bytes:
        parts = []
        while chunk := await self.read():
            parts.append(chunk)
        return b"".join(parts)

    async def write(self, data: bytes) -> None:
        """Send ``data`` of the request body; waits while the device has no room."""
        self._check_writable()
        self._streams.send(self, data)
        await self._streams.wait_room(self)
        self._check_writable()

    def end(self) -> None:
        """End the request body (FIN)."""
        self._check_writable()
        self._ended = True
        self._streams.send_fin(self)

    def reset(self, reason: str = "cancelled") -> None:
        """Abandon the exchange (RESET ``CANCEL``)."""
        self._streams.reset(self, ResetCode.CANCEL, reason)

    def _check_writable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._ended:
            raise TunnelUsageError("the request body has ended")

    # -- from the multiplexer ------------------------------------------------------

    def on_head(self, head: ResponseHead) -> None:
        if not self._head.done():
            self._head.set_result(head)

    def on_data(self, data: bytes) -> None:
        self._chunks.append(data)
        self._readable.set()

    def on_fin(self) -> None:
        self.remote_fin = True
        self._readable.set()

    def on_reset(self, code: int, reason: str, *, remote: bool) -> None:
        self._error = HttpStreamReset(code, reason, remote=remote)
        if not self.remote_fin:
            self._chunks.clear()  # a body cut short is no body: never read as one
        if not self._head.done():
            self._head.set_exception(self._error)
            self._head.exception()  # retrieved: a caller that never asks is not an error
        self._readable.set()
        self.room.set()


class _DeviceExchange(_Exchange):
    """The device's side of one HTTP stream: the request performed on a service."""

    def __init__(
        self, streams: HttpStreams, stream_id: int, upstream: Upstream, request: RequestHead
    ) -> None:
        super().__init__(stream_id)
        self._streams = streams
        self.upstream = upstream
        self.request = request
        self.upgrade = is_upgrade_request(request)
        self.body: deque[bytes] = deque()
        self.body_event = asyncio.Event()
        self.conn: _Connection | None = None
        self.head_sent = False
        self.request_done = False
        self.switched = False  # after 101: raw bytes both ways
        self.upload_done = asyncio.Event()  # after 101: the client's FIN reached the service
        self.finished = False  # our FIN queued (the response is complete)

    # -- from the multiplexer ------------------------------------------------------

    def on_data(self, data: bytes) -> None:
        if self.upgrade and not self.switched:
            self._streams.reset(self, ResetCode.PROTOCOL, "DATA on an upgrade request before 101")
            return
        if self.finished and not self.switched:
            # The response is complete; the rest of the upload has nowhere to go.
            self._streams.acknowledge(self, len(data))
            return
        self.body.append(data)
        self.body_event.set()

    def on_fin(self) -> None:
        self.remote_fin = True
        self.body_event.set()
        self._streams.maybe_done(self)

    # -- the exchange ----------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._exchange()
        except _Abort as exc:
            self._fail(exc.code, exc.reason)
        except (ConnectionError, OSError) as exc:
            self._fail(ResetCode.CONNECTION_RESET, f"service connection lost: {_describe(exc)}")
        except Exception as exc:  # a bug here must cost one stream, never the session
            log.exception("%shttp stream %d failed", self._streams.label, self.stream_id)
            self._fail(ResetCode.CANCEL, f"device error: {type(exc).__name__}")

    def _fail(self, code: ResetCode, reason: str) -> None:
        if code is not ResetCode.CANCEL:
            log.info("%shttp stream %d: %s", self._streams.label, self.stream_id, reason)
        self._streams.reset(self, code, reason)

    async def _exchange(self) -> None:
        framing = await self._framing()
        if self.dead:
            return
        try:
            request = h11.Request(
                method=self.request.method,
                target=self.request.target,
                headers=[
                    (b"host", self.upstream.host_header),
                    *end_to_end_fields(self.request.headers, drop=_DROP, keep_upgrade=self.upgrade),
                    *framing,
                ],
            )
        except h11.LocalProtocolError as exc:  # e.g. a bad content-length
            raise _Abort(ResetCode.BAD_HEAD, f"bad request head: {exc}") from None
        bodiless = self.upgrade or (not framing and not _has_length(self.request))
        # A kept-alive connection the service closed just as we took it fails
        # before any answer: a request with no body can then safely go again.
        for attempt in (1, 2):
            conn = await self._connect(fresh=attempt == 2)
            if self.dead:
                conn.abort()
                return
            self.conn = conn
            conn.writer.write(conn.h11.send(request))
            if bodiless:
                conn.writer.write(conn.h11.send(h11.EndOfMessage()))
                self.request_done = True
            else:
                self._streams.spawn(self, self._upload(conn))
            try:
                await self._download(conn)
                return
            except (ConnectionError, OSError, _Abort) as exc:
                retry = conn.reused and bodiless and not self.head_sent and attempt == 1
                conn.abort()
                self.conn = None
                if not retry:
                    raise
                log.debug("stale kept-alive connection (%s); retrying", exc)

    async def _connect(self, *, fresh: bool) -> _Connection:
        try:
            return await self._streams.pool.acquire(self.upstream, fresh=fresh)
        except (OSError, TimeoutError) as exc:
            raise _Abort(
                ResetCode.CONNECT_FAILED, f"cannot connect to the service: {_describe(exc)}"
            ) from None

    async def _framing(self) -> list[tuple[bytes, bytes]]:
        """Extra request fields saying how the body is delimited (PROTOCOL.md §2.8)."""
        if self.upgrade or _has_length(self.request):
            return []
        # No length: the client's first move decides: FIN means no body, DATA a
        # body of unknown length, sent chunked.
        while not self.body and not self.remote_fin and not self.dead:
            self.body_event.clear()
            await self.body_event.wait()
        return [(b"transfer-encoding", b"chunked")] if self.body else []

    async def _upload(self, conn: _Connection) -> None:
        try:
            while not self.dead:
                if self.body:
                    chunk = self.body.popleft()
                    conn.writer.write(conn.h11.send(h11.Data(data=chunk)))
                    await conn.writer.drain()
                    self._streams.acknowledge(self, len(chunk))
                elif self.remote_fin:
                    conn.writer.write(conn.h11.send(h11.EndOfMessage()))
                    self.request_done = True
                    return
                else:
                    self.body_event.clear()
                    await self.body_event.wait()
        except h11.LocalProtocolError as exc:  # more or less body than content-length
            self._fail(ResetCode.PROTOCOL, f"request body: {exc}")
        except (ConnectionError, OSError) as exc:
            if not self.finished:
                self._fail(ResetCode.CONNECTION_RESET, f"service connection lost: {_describe(exc)}")

    async def _download(self, conn: _Connection) -> None:
        parser = conn.h11
        while not self.dead:
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError as exc:
                if self.head_sent:
                    raise _Abort(ResetCode.CONNECTION_RESET, f"response body: {exc}") from None
                raise _Abort(ResetCode.BAD_GATEWAY, f"the service's answer: {exc}") from None
            if event is h11.NEED_DATA:
                data = await conn.reader.read(READ_SIZE)
                parser.receive_data(data)
            elif isinstance(event, h11.Response):
                self._send_head(event)
            elif isinstance(event, h11.Data):
                await self._send_body(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                await self._complete(conn)
                return
            elif isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    self._send_head(event)
                    await self._switch(conn)
                    return
                # 100 Continue, 103 Early Hints: a browser's fetch cannot take them.
            elif isinstance(event, h11.ConnectionClosed):
                raise _Abort(ResetCode.BAD_GATEWAY, "the service closed without a response")

    def _send_head(self, event: h11.Response | h11.InformationalResponse) -> None:
        try:
            head = ResponseHead(
                event.status_code,
                event.reason.strip(),
                tuple(end_to_end_fields(event.headers, keep_upgrade=event.status_code == 101)),
            )
            self._streams.mux.send_head(self.stream_id, head)
        except LocalProtocolError as exc:
            raise _Abort(ResetCode.BAD_GATEWAY, f"cannot pass the response on: {exc}") from None
        self.head_sent = True
        self._streams.flush()

    async def _send_body(self, data: bytes) -> None:
        if data:
            self._streams.send(self, data)
            await self._streams.wait_room(self)

    async def _complete(self, conn: _Connection) -> None:
        self.finished = True
        self._streams.send_fin(self)
        if not self.request_done and self.remote_fin and not self.body:
            # The service often answers as the last body bytes reach it, while the
            # upload still waits for them to drain: let it end the request, so the
            # connection can be kept, but not for ever (a service that answered
            # without reading may never drain them).
            for task in list(self.tasks):
                if task is not asyncio.current_task():
                    with contextlib.suppress(Exception, asyncio.CancelledError):
                        await asyncio.wait_for(task, UPLOAD_GRACE)
        parser = conn.h11
        if self.request_done and parser.our_state is h11.DONE and parser.their_state is h11.DONE:
            parser.start_next_cycle()
            self.conn = None
            self._streams.pool.release(conn)
        else:
            conn.abort()
            self.conn = None
        if not self.remote_fin and not self.dead:
            # The service answered before the upload ended: stop it (§2.8), once
            # our FIN is on the wire, since a RESET would drop it.
            await self._streams.wait_fin_sent(self)
            self._streams.reset(self, ResetCode.CANCEL, "response complete")
        else:
            self._streams.maybe_done(self)

    async def _switch(self, conn: _Connection) -> None:
        """After 101: the stream carries raw bytes both ways (a WebSocket)."""
        self.switched = True  # conn stays self.conn: never pooled, aborted on a reset
        trailing, closed = conn.h11.trailing_data
        if trailing:
            await self._send_body(bytes(trailing))
        self._streams.spawn(self, self._raw_upload(conn))
        try:
            while not self.dead and not closed:
                data = await conn.reader.read(READ_SIZE)
                if not data:
                    break
                await self._send_body(data)
        finally:
            if self.dead:
                conn.abort()
        if self.dead:
            return
        self.finished = True  # the service's side ended (EOF)
        self._streams.send_fin(self)
        await self.upload_done.wait()
        self.conn = None
        conn.writer.close()
        self._streams.maybe_done(self)

    async def _raw_upload(self, conn: _Connection) -> None:
        while not self.dead:
            if self.body:
                chunk = self.body.popleft()
                conn.writer.write(chunk)
                await conn.writer.drain()
                self._streams.acknowledge(self, len(chunk))
            elif self.remote_fin:
                if conn.writer.can_write_eof():
                    conn.writer.write_eof()
                self.upload_done.set()
                return
            else:
                self.body_event.clear()
                await self.body_event.wait()


class HttpStreams:
    """The HTTP streams of one session's multiplexer (see the module docstring).

    ``flush`` sends what the multiplexer has queued; ``admit`` resolves a
    service for a stream the client opened (the bridge's rules: exposed
    services only, none while draining).
    """

    def __init__(
        self,
        mux: Multiplexer,
        flush: Callable[[], None],
        *,
        admit: Admit,
        open_connection: OpenConnection,
        stats: Callable[[str], ByteCounters],
        label: str = "",
    ) -> None:
        self.mux = mux
        self.stats = stats  # the counters of a service
        self.flush = flush
        self.label = label
        self.pool = ConnectionPool(open_connection)
        self._admit = admit
        #: The live exchanges by stream id: the bridge routes these streams' events here.
        self.exchanges: dict[int, _DeviceExchange | HttpExchange] = {}
        self._closed: str | None = None

    def __len__(self) -> int:
        return len(self.exchanges)

    # -- client side -------------------------------------------------------------------

    def open(self, service: str, request: RequestHead) -> HttpExchange:
        """Start ``request`` to ``service`` on a new HTTP stream. Write the body with
        :meth:`HttpExchange.write` and end it with :meth:`HttpExchange.end` (at
        once for a request without one)."""
        if self._closed is not None:
            raise TunnelUsageError(f"the tunnel is closed: {self._closed}")
        stream_id = self.mux.open_http_stream(service, request)
        exchange = HttpExchange(self, stream_id)
        exchange.stats = self.stats(service)
        self.exchanges[stream_id] = exchange
        self.flush()
        return exchange

    # -- events (the bridge routes every HTTP stream's events here) --------------------

    def on_event(self, event: Event) -> None:
        if isinstance(event, HttpStreamOpened):
            self._on_open(event)
            return
        exchange = self.exchanges.get(event.stream_id)
        if exchange is None:
            return
        if isinstance(event, DataReceived):
            exchange.stats.bytes_in += len(event.data)
            exchange.on_data(event.data)
        elif isinstance(event, StreamEnded):
            exchange.on_fin()
        elif isinstance(event, StreamReset):
            self._kill(exchange)
            if isinstance(exchange, HttpExchange):
                exchange.on_reset(event.code, event.reason, remote=event.remote)
            elif not event.remote:
                log.warning("%shttp stream %d reset: %s", self.label, event.stream_id, event.reason)
        elif isinstance(event, HeadReceived) and isinstance(exchange, HttpExchange):
            exchange.on_head(event.response)

    def _on_open(self, event: HttpStreamOpened) -> None:
        upstream = self._admit(event.stream_id, event.service)
        if upstream is None:
            return
        exchange = _DeviceExchange(self, event.stream_id, upstream, event.request)
        exchange.stats = self.stats(event.service)
        self.exchanges[event.stream_id] = exchange
        self.spawn(exchange, exchange.run())

    def on_flushed(self) -> None:
        """The bridge sent what it could: wake the senders that now have room, and
        forget the exchanges whose streams the multiplexer closed (their last FIN
        may leave only now)."""
        closed = []
        for exchange in self.exchanges.values():
            if not exchange.room.is_set() and (
                self.mux.pending_bytes(exchange.stream_id) <= STREAM_SEND_HIGH
            ):
                exchange.room.set()
            if self.mux.stream_state(exchange.stream_id) is None:
                closed.append(exchange)
        for exchange in closed:
            self._forget(exchange)

    def close(self, reason: str) -> None:
        """The session is over: abort every exchange and pooled connection."""
        self._closed = reason
        for exchange in list(self.exchanges.values()):
            self._kill(exchange)
            if isinstance(exchange, HttpExchange):
                exchange.on_reset(ResetCode.CANCEL, f"tunnel closed: {reason}", remote=False)
        self.pool.close()

    # -- what exchanges ask for ------------------------------------------------------------

    def send(self, exchange: _Exchange, data: bytes) -> None:
        if not exchange.dead:
            exchange.stats.bytes_out += len(data)
            self.mux.send_data(exchange.stream_id, data)
            self.flush()

    def send_fin(self, exchange: _Exchange) -> None:
        if not exchange.dead:
            self.mux.send_fin(exchange.stream_id)
            self.flush()

    def acknowledge(self, exchange: _Exchange, n: int) -> None:
        if not exchange.dead:
            self.mux.acknowledge(exchange.stream_id, n)
            self.flush()

    async def wait_room(self, exchange: _Exchange) -> None:
        while not exchange.dead and self.mux.pending_bytes(exchange.stream_id) > STREAM_SEND_HIGH:
            exchange.room.clear()
            await exchange.room.wait()

    async def wait_fin_sent(self, exchange: _Exchange) -> None:
        while not exchange.dead and self.mux.stream_state(exchange.stream_id) in (
            StreamState.OPEN,
            StreamState.HALF_CLOSED_REMOTE,
        ):
            exchange.room.clear()
            await exchange.room.wait()

    def reset(self, exchange: _Exchange, code: int, reason: str) -> None:
        if exchange.dead:
            return
        with contextlib.suppress(LocalProtocolError):
            self.mux.reset_stream(exchange.stream_id, code, reason)
        self._kill(exchange)
        if isinstance(exchange, HttpExchange):
            exchange.on_reset(code, reason, remote=False)
        self.flush()

    def maybe_done(self, exchange: _Exchange) -> None:
        """Forget an exchange once its stream is closed both ways."""
        if self.mux.stream_state(exchange.stream_id) is None and not exchange.dead:
            exchange.dead = True
            self._forget(exchange)

    def spawn(self, exchange: _Exchange, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        exchange.tasks.add(task)
        task.add_done_callback(exchange.tasks.discard)

    def _forget(self, exchange: _Exchange) -> None:
        self.exchanges.pop(exchange.stream_id, None)

    def _kill(self, exchange: _Exchange) -> None:
        exchange.dead = True
        exchange.room.set()
        self._forget(exchange)
        if isinstance(exchange, _DeviceExchange):
            exchange.body_event.set()
            if exchange.conn is not None:
                exchange.conn.abort()
                exchange.conn = None
        current = asyncio.current_task()
        for task in exchange.tasks:
            if task is not current:
                task.cancel()


def _has_length(request: RequestHead) -> bool:
    return bool(field_values(request.headers, b"content-length"))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
