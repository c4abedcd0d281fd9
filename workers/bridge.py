"""Moves bytes between TCP connections and tunnel streams on one DataChannel.

The sans-I/O :class:`protocol.mux.Multiplexer` decides what goes on the wire;
this module is its asyncio adapter (PROTOCOL.md §2). One :class:`TunnelBridge`
serves one session's DataChannel:

* **device side** (``services`` given): a peer's OPEN names a service; the bridge
  connects to that service's configured address, and to nothing else: an
  unknown name is reset with ``UNKNOWN_SERVICE`` (never an open proxy).
* **client side**: :meth:`TunnelBridge.attach` turns an accepted local TCP
  connection into a stream to a named service.
* HTTP streams (PROTOCOL.md §2.8), on either side, are :attr:`TunnelBridge.http`'s
  (:mod:`workers.http_streams`); the bridge routes their events there.

Backpressure, end to end, so no buffer grows without bound:

* TCP → tunnel: the reader stops reading its socket while more than
  ``STREAM_SEND_HIGH`` bytes of that stream wait in the multiplexer (which only
  frames them as the peer grants credit), and the bridge stops handing messages
  to aiortc while the channel's ``bufferedAmount`` is above ``CHANNEL_HIGH``.
* tunnel → TCP: received data is acknowledged (credit returned to the peer)
  only after the local socket's write buffer has drained, so a slow reader holds
  at most one window per stream on this side: ``INITIAL_WINDOW``, grown with
  each grant up to ``RECEIVE_WINDOW`` once the stream's reader keeps up.

Per session, memory is bounded by about
``streams * (RECEIVE_WINDOW + STREAM_SEND_HIGH) + CHANNEL_HIGH``.

Endings, as the applications at both ends see them: a FIN is a TCP half-close
(``shutdown(SHUT_WR)``) and a stream whose two halves are closed closes its TCP
connection gracefully; a RESET, whatever its code, and the end of the session
abort the TCP connection with an RST (``SO_LINGER`` 0), never a FIN, so a
truncated transfer can never pass for a complete one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from aiortc import RTCDataChannel

from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.frames import ResetCode
from protocol.mux import (
    DataReceived,
    HttpStreamOpened,
    Multiplexer,
    Role,
    StreamEnded,
    StreamOpened,
    StreamReset,
)
from workers.http_streams import HttpStreams, Upstream

log = logging.getLogger("tunnelctl.bridge")

CHANNEL_HIGH = 1024 * 1024
CHANNEL_LOW = 256 * 1024
STREAM_SEND_HIGH = 256 * 1024
#: How far a stream's receive window grows (from the spec's 256 KiB): the credit
#: in flight must cover the round trip of a WINDOW frame behind a full channel
#: buffer, or the sender idles; with 256 KiB it ran dry in about one flush in
#: ten during a download on loopback.
RECEIVE_WINDOW = 1024 * 1024
READ_SIZE = 64 * 1024
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class ServiceAddress:
    """Where a named service listens (TCP host and port)."""

    host: str
    port: int


OpenConnection = Callable[
    [ServiceAddress], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
]


async def open_tcp(address: ServiceAddress) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(
        asyncio.open_connection(address.host, address.port, limit=READ_SIZE), CONNECT_TIMEOUT
    )


@dataclass(slots=True)
class BridgeStats:
    bytes_in: int = 0  # tunnel → local TCP
    bytes_out: int = 0  # local TCP → tunnel
    streams_opened: int = 0
    streams_refused: int = 0

    def add(self, other: BridgeStats) -> None:
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.streams_opened += other.streams_opened
        self.streams_refused += other.streams_refused


@dataclass(eq=False, slots=True)
class _Stream:
    stream_id: int
    service: str
    writer: asyncio.StreamWriter | None = None
    held: list[bytes] = field(default_factory=list)  # received before the TCP connect finished
    unacked: int = 0
    acking: bool = False
    remote_fin: bool = False
    local_fin: bool = False
    received_any: bool = False
    dead: bool = False
    writable: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    # Its service's figures (shared by that service's streams): counting per
    # service costs the data path nothing over counting per session.
    stats: BridgeStats = field(default_factory=BridgeStats)


class TunnelBridge:
    """One session's DataChannel, carrying many TCP streams."""

    def __init__(
        self,
        channel: RTCDataChannel,
        role: Role,
        *,
        services: Mapping[str, ServiceAddress] | None = None,
        open_connection: OpenConnection = open_tcp,
        on_refused: Callable[[str, int, str], None] | None = None,
        max_streams: int = 1024,
        label: str = "",
    ) -> None:
        self.channel = channel
        self.mux = Multiplexer(role, max_streams=max_streams, max_receive_window=RECEIVE_WINDOW)
        self._refused = BridgeStats()
        self._by_service: dict[str, BridgeStats] = {}
        self._services = dict(services or {})
        self._accepts_streams = services is not None
        self._open_connection = open_connection
        self._on_refused = on_refused
        self._label = label
        self._streams: dict[int, _Stream] = {}
        self._draining = False
        self._drained = asyncio.Event()  # draining, no stream left, nothing queued
        self._loop = asyncio.get_running_loop()
        self._closed = self._loop.create_future()
        self._flush_scheduled = False
        self.http = HttpStreams(
            self.mux,
            self._flush,
            admit=self._admit_http,
            open_connection=lambda up: open_connection(ServiceAddress(up.host, up.port)),
            stats=self._service_stats,
            label=label,
        )
        channel.bufferedAmountLowThreshold = CHANNEL_LOW
        channel.on("message", self._on_message)
        channel.on("bufferedamountlow", self._flush)
        channel.on("close", lambda: self._shutdown("DataChannel closed"))
        if channel.readyState == "closed":
            self._shutdown("DataChannel closed")

    def expose(self, services: Mapping[str, ServiceAddress], *, label: str = "") -> None:
        """Set the services streams may reach (a bridge built before its session's)."""
        self._services = dict(services)
        self._accepts_streams = True
        self._label = label or self._label
        self.http.label = self._label

    @property
    def stats(self) -> BridgeStats:
        """The session's figures: every service's, summed."""
        total = BridgeStats()
        total.add(self._refused)
        for figures in self._by_service.values():
            total.add(figures)
        return total

    @property
    def service_stats(self) -> Mapping[str, BridgeStats]:
        """Figures by service, for each service a stream was opened to."""
        return self._by_service

    def _service_stats(self, service: str) -> BridgeStats:
        figures = self._by_service.get(service)
        if figures is None:
            figures = self._by_service[service] = BridgeStats()
        return figures

    @property
    def stream_count(self) -> int:
        return len(self._streams) + len(self.http)

    @property
    def is_closed(self) -> bool:
        return self._closed.done()

    async def wait_closed(self) -> str:
        """Wait until the channel is gone; return why."""
        return await asyncio.shield(self._closed)

    def attach(
        self, service: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> int:
        """Carry an accepted local connection to ``service`` on a new stream (client side)."""
        if self.is_closed:
            abort_connection(writer)
            raise LocalProtocolError("the tunnel is closed")
        stream_id = self.mux.open_stream(service)
        stream = _Stream(stream_id, service, writer=writer)
        self._add(stream)
        self._spawn(stream, self._pump_out(stream, reader))
        self._flush()
        return stream_id

    async def drain(self, timeout: float) -> bool:
        """Refuse new streams and wait up to ``timeout`` for the open ones to finish.

        Return True if every stream finished in time.
        """
        self._draining = True
        self._check_drained()
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def close(self, reason: str = "closed") -> None:
        """Abort every stream and close the channel."""
        if self._flush_scheduled:
            self._flush_now()  # what was decided before the close still leaves
        self._shutdown(reason)
        with contextlib.suppress(Exception):
            self.channel.close()

    # -- tunnel → TCP -------------------------------------------------------

    def _on_message(self, message: bytes | str) -> None:
        if self.is_closed:
            return
        if isinstance(message, str):
            self._session_error("text message on the tunnel channel")
            return
        try:
            self.mux.receive_message(message)
        except RemoteProtocolError as exc:
            self._session_error(str(exc))
            return
        http = self.http
        exchanges = http.exchanges
        for event in self.mux.events():
            if (exchanges and event.stream_id in exchanges) or isinstance(event, HttpStreamOpened):
                http.on_event(event)
            elif isinstance(event, DataReceived):
                self._on_data(event.stream_id, event.data)
            elif isinstance(event, StreamOpened):
                self._on_open(event.stream_id, event.service)
            elif isinstance(event, StreamEnded):
                self._on_remote_fin(event.stream_id)
            elif isinstance(event, StreamReset):
                self._on_reset(event)
        self._flush()

    def _on_open(self, stream_id: int, service: str) -> None:
        address = self._admit(stream_id, service)
        if address is None:
            return
        stream = _Stream(stream_id, service)
        self._add(stream)
        self._spawn(stream, self._connect(stream, address))

    def _admit_http(self, stream_id: int, service: str) -> Upstream | None:
        address = self._admit(stream_id, service)
        if address is None:
            return None
        self._service_stats(service).streams_opened += 1
        return Upstream(address.host, address.port)

    def _admit(self, stream_id: int, service: str) -> ServiceAddress | None:
        """The address a stream the peer opened may reach; ``None`` once it is reset
        (shutting down, a service that is not exposed, a side that takes no streams)."""
        if self._draining:
            self._refused.streams_refused += 1
            self.mux.reset_stream(stream_id, ResetCode.REFUSED, "device is shutting down")
            return None
        address = self._services.get(service)
        if address is None:
            self._refused.streams_refused += 1
            if self._accepts_streams:
                log.warning(
                    "%srefused stream %d: service %r is not exposed",
                    self._label,
                    stream_id,
                    service,
                )
                self.mux.reset_stream(
                    stream_id, ResetCode.UNKNOWN_SERVICE, f"service {service!r} is not exposed"
                )
            else:
                self.mux.reset_stream(stream_id, ResetCode.REFUSED, "this side accepts no streams")
        return address

    async def _connect(self, stream: _Stream, address: ServiceAddress) -> None:
        try:
            reader, writer = await self._open_connection(address)
        except (OSError, TimeoutError) as exc:
            reason = f"cannot connect to service {stream.service!r}: {_describe(exc)}"
            log.info("%sstream %d: %s", self._label, stream.stream_id, reason)
            self._reset(stream, ResetCode.CONNECT_FAILED, reason)
            return
        if stream.dead:
            abort_connection(writer)
            return
        stream.writer = writer
        for chunk in stream.held:
            writer.write(chunk)
        stream.held.clear()
        if stream.unacked:
            self._schedule_ack(stream)
        if stream.remote_fin:
            self._write_eof(stream)
        self._spawn(stream, self._pump_out(stream, reader))

    def _on_data(self, stream_id: int, data: bytes) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.dead:
            return
        stream.received_any = True
        stream.stats.bytes_in += len(data)
        stream.unacked += len(data)
        if stream.writer is None:
            stream.held.append(data)  # bounded: the peer's credit covers it
            return
        writer = stream.writer
        writer.write(data)
        if stream.acking or writer.transport.get_write_buffer_size():
            self._schedule_ack(stream)
        else:
            # The kernel took it all: credit goes back now, without a task and a
            # wake-up per message (the mux sends WINDOW only past half the window).
            n, stream.unacked = stream.unacked, 0
            self.mux.acknowledge(stream_id, n)

    def _schedule_ack(self, stream: _Stream) -> None:
        if not stream.acking:
            stream.acking = True
            self._spawn(stream, self._ack_after_drain(stream))

    async def _ack_after_drain(self, stream: _Stream) -> None:
        writer = stream.writer
        assert writer is not None
        try:
            await writer.drain()
        except (ConnectionError, OSError):
            self._reset(stream, ResetCode.CONNECTION_RESET, "local connection lost")
            return
        finally:
            stream.acking = False
        n, stream.unacked = stream.unacked, 0
        if n and not stream.dead:
            self.mux.acknowledge(stream.stream_id, n)
            self._flush()
        if stream.unacked and not stream.dead:
            self._schedule_ack(stream)

    def _on_remote_fin(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.remote_fin = True
        if stream.writer is not None:
            self._write_eof(stream)

    def _write_eof(self, stream: _Stream) -> None:
        writer = stream.writer
        assert writer is not None
        try:
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            pass
        self._maybe_finished(stream)

    def _on_reset(self, event: StreamReset) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        if (
            event.remote
            and not stream.received_any
            and event.code
            in (ResetCode.UNKNOWN_SERVICE, ResetCode.CONNECT_FAILED, ResetCode.REFUSED)
        ):
            if self._on_refused is not None:
                self._on_refused(stream.service, event.code, event.reason)
        elif not event.remote:
            log.warning("%sstream %d reset: %s", self._label, event.stream_id, event.reason)
        self._kill(stream)

    # -- TCP → tunnel -------------------------------------------------------

    async def _pump_out(self, stream: _Stream, reader: asyncio.StreamReader) -> None:
        try:
            while not stream.dead:
                data = await reader.read(READ_SIZE)
                if stream.dead:
                    return
                if not data:
                    stream.local_fin = True
                    self.mux.send_fin(stream.stream_id)
                    self._flush()
                    self._maybe_finished(stream)
                    return
                stream.stats.bytes_out += len(data)
                self.mux.send_data(stream.stream_id, data)
                self._flush()
                while (
                    not stream.dead and self.mux.pending_bytes(stream.stream_id) > STREAM_SEND_HIGH
                ):
                    stream.writable.clear()
                    await stream.writable.wait()
        except (ConnectionError, OSError):
            self._reset(stream, ResetCode.CONNECTION_RESET, "local connection reset")
        except LocalProtocolError:
            self._kill(stream)  # the stream was reset under us

    def _flush(self) -> None:
        """Send what the mux has queued, at the end of this turn of the event loop.

        Everything decided in one turn (reads of several sockets, the frames of
        one received message, their acknowledgements) goes out together: one
        DataChannel message of several frames, so one SCTP chunk and, for small
        frames, one packet, instead of one each (PROTOCOL.md §2.1).
        """
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_scheduled = False
        channel = self.channel
        if self.is_closed or channel.readyState != "open":
            return
        while self.mux.wants_to_send():
            room = CHANNEL_HIGH - channel.bufferedAmount
            if room <= 0:
                break
            for message in self.mux.data_to_send(max_bytes=room):
                channel.send(message)
        for stream in self._streams.values():
            if (
                not stream.writable.is_set()
                and self.mux.pending_bytes(stream.stream_id) <= STREAM_SEND_HIGH
            ):
                stream.writable.set()
        if self.http.exchanges:
            self.http.on_flushed()
        self._check_drained()

    # -- endings ------------------------------------------------------------

    def _maybe_finished(self, stream: _Stream) -> None:
        if stream.local_fin and stream.remote_fin and not stream.dead:
            stream.dead = True
            self._forget(stream)
            if stream.writer is not None:
                stream.writer.close()

    def _reset(self, stream: _Stream, code: int, reason: str) -> None:
        if not stream.dead:
            with contextlib.suppress(LocalProtocolError):
                self.mux.reset_stream(stream.stream_id, code, reason)
            self._flush()
        self._kill(stream)

    def _kill(self, stream: _Stream) -> None:
        """Forget a stream and drop its TCP connection abruptly (the peer sees a reset)."""
        stream.dead = True
        stream.writable.set()
        self._forget(stream)
        if stream.writer is not None:
            abort_connection(stream.writer)
        current = asyncio.current_task()
        for task in stream.tasks:
            if task is not current:
                task.cancel()

    def _add(self, stream: _Stream) -> None:
        self._streams[stream.stream_id] = stream
        stream.stats = self._service_stats(stream.service)
        stream.stats.streams_opened += 1

    def _forget(self, stream: _Stream) -> None:
        self._streams.pop(stream.stream_id, None)
        self._check_drained()

    def _check_drained(self) -> None:
        if self._draining and not self._streams and self.mux.stream_count == 0:
            self._drained.set()

    def _spawn(self, stream: _Stream, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        stream.tasks.add(task)
        task.add_done_callback(stream.tasks.discard)

    def _session_error(self, reason: str) -> None:
        log.warning("%stunnel protocol error, closing the session: %s", self._label, reason)
        self.close(f"protocol error: {reason}")

    def _shutdown(self, reason: str) -> None:
        if self._closed.done():
            return
        self._closed.set_result(reason)
        for stream in list(self._streams.values()):
            self._kill(stream)
        self.http.close(reason)


_LINGER_ZERO = struct.pack("ii", 1, 0)


def abort_connection(writer: asyncio.StreamWriter) -> None:
    """Close a TCP connection with an RST: its peer reads ECONNRESET, not EOF.

    ``transport.abort()`` alone only skips the write buffer; the kernel would
    still end the connection with a FIN, which the peer cannot tell from a
    complete transfer. ``SO_LINGER`` 0 makes the close send an RST instead.
    """
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    writer.transport.abort()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
