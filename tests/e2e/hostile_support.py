"""A hostile tunnel client and the services it is pointed at (end-to-end tests).

:class:`HostileClient` negotiates a session with a real device exactly as
``workers/client.py`` does — :class:`~signaling.link.SignalingLink`, a
``session_request``, a :class:`~workers.peer.PeerSession` answering the device's
offer — but instead of a :class:`~workers.bridge.TunnelBridge` it writes whatever
the test hands it on the DataChannel (PROTOCOL.md §2) and decodes what the
device's worker sends back with :func:`protocol.frames.decode_message`. It also
holds the worker to the protocol: a message that does not decode, a text
message, or DATA beyond the credit this client granted is recorded in
:attr:`HostileClient.violations`.

:func:`running_device` starts a signaling server and a device (a supervisor
with forked worker processes) that exposes three services: ``web`` (the e2e
HTTP server), ``flood`` (:class:`FloodService`: sends 64 MiB to whoever connects,
counting what the kernel accepted) and ``stalled`` (:class:`StalledService`: a
port whose accept queue is full, so a connect to it hangs).

Every wait has a deadline; processes are stopped by pid (``Child.stop``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiortc import RTCDataChannel

from aio.tasks import TaskSet
from harness import Child
from protocol.errors import RemoteProtocolError
from protocol.frames import (
    INITIAL_WINDOW,
    Data,
    Fin,
    Frame,
    Open,
    OpenHttp,
    Reset,
    ResetCode,
    Window,
    decode_message,
    encode_frames,
)
from protocol.signaling import (
    Candidate,
    Error,
    Offer,
    SessionEnd,
    SessionRequest,
    SignalingMessage,
    new_session_id,
)
from signaling.link import SignalingLink
from tests.e2e.conftest import LOOPBACK, READY, Tunnel, WebService
from tests.e2e.test_supervisor import ctl_json
from workers.peer import PeerSession

log = logging.getLogger("tests.hostile")

#: Deadline for one exchange with the worker (a reply, a closed channel).
REPLY = 15.0
FLOOD_SIZE = 64 * 1024 * 1024
#: A service whose send() blocks this long is considered stalled by its peer.
STALL = 2.0


def raw_frame(
    frame_type: int,
    stream_id: int,
    payload: bytes = b"",
    *,
    flags: int = 0,
    length: int | None = None,
) -> bytes:
    """A frame built by hand, so a test can put any header on the wire (§2.2)."""
    length = len(payload) if length is None else length
    return (
        bytes([frame_type, flags])
        + length.to_bytes(2, "big")
        + stream_id.to_bytes(4, "big")
        + payload
    )


def vm_rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (``VmRSS`` of /proc/PID/status).

    Raises :class:`ProcessLookupError` once the process has exited (a zombie has
    no VmRSS)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ProcessLookupError(pid)


def tcp_queues(local_port: int, remote_port: int) -> tuple[int, int]:
    """``(tx_queue, rx_queue)`` in bytes of the IPv4 loopback TCP socket bound to
    ``local_port`` and connected to ``remote_port`` (/proc/net/tcp), whichever
    process owns it."""
    local = f"0100007F:{local_port:04X}"
    remote = f"0100007F:{remote_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote:
            tx, rx = fields[4].split(":")
            return int(tx, 16), int(rx, 16)
    raise AssertionError(f"no TCP socket 127.0.0.1:{local_port} -> :{remote_port}")


# -- services -------------------------------------------------------------------


@dataclass(eq=False)
class FloodConnection:
    """One connection to :class:`FloodService`: how much it managed to send."""

    sock: socket.socket
    peer_port: int
    sent: int = 0  # bytes the kernel accepted from us
    error: OSError | None = None
    stalled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    on_progress: Callable[[int], None] | None = None
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def wait_sent_above(self, count: int, timeout: float) -> int:
        """Block until more than ``count`` bytes were sent (or the connection is
        done); return the count. For ``asyncio.to_thread``."""
        with self._changed:
            if not self._changed.wait_for(
                lambda: self.sent > count or self.finished.is_set(), timeout
            ):
                raise TimeoutError(f"the flood service sent no more than {count} bytes")
            return self.sent

    def run(self, size: int) -> None:
        chunk = memoryview(bytes(range(256)) * 256)  # 64 KiB
        self.sock.settimeout(STALL)
        try:
            while self.sent < size:
                try:
                    n = self.sock.send(chunk[: min(len(chunk), size - self.sent)])
                except TimeoutError:
                    self.stalled.set()  # nobody reads: keep trying, the peer may grant later
                    continue
                with self._changed:
                    self.sent += n
                    self._changed.notify_all()
                if self.on_progress is not None:
                    self.on_progress(self.sent)
        except OSError as exc:
            self.error = exc
        finally:
            with self._changed:
                self.finished.set()
                self._changed.notify_all()
            self.sock.close()


class FloodService:
    """A TCP service that sends ``size`` bytes to each connection as fast as the
    connection takes them."""

    def __init__(self, size: int = FLOOD_SIZE) -> None:
        self.size = size
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.connections: list[FloodConnection] = []
        self._accepted = threading.Condition()
        threading.Thread(target=self._accept_loop, daemon=True, name="flood").start()

    def wait_connection(self, index: int, timeout: float) -> FloodConnection:
        """Block until connection number ``index`` (0-based) arrived."""
        with self._accepted:
            if not self._accepted.wait_for(lambda: len(self.connections) > index, timeout):
                raise TimeoutError("nobody connected to the flood service")
            return self.connections[index]

    def close(self) -> None:
        self.listener.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, (_, port) = self.listener.accept()
            except OSError:
                return  # closed
            connection = FloodConnection(sock, port)
            with self._accepted:
                self.connections.append(connection)
                self._accepted.notify_all()
            threading.Thread(
                target=connection.run, args=(self.size,), daemon=True, name="flood-conn"
            ).start()


class StalledService:
    """A listening port whose accept queue is full: Linux drops the SYNs of any
    further connect, so the worker's connect to it hangs (until its own timeout).
    Data a peer sends on such a stream waits in the worker, unacknowledged."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)  # room for exactly one queued connection...
        self.port: int = self.listener.getsockname()[1]
        self.filler = socket.create_connection(("127.0.0.1", self.port), timeout=5)  # ...taken

    def close(self) -> None:
        self.filler.close()
        self.listener.close()


# -- the device -------------------------------------------------------------------


@dataclass
class HostileDevice:
    """A signaling server and device ``device_id`` (a supervisor) on loopback."""

    tunnel: Tunnel
    device_id: str
    supervisor: Child
    signal: Child
    runtime: Path
    flood: FloodService
    stalled: StalledService

    def token(self, client: str) -> str:
        return self.tunnel.token(client, "client", (self.device_id,))

    async def session_row(
        self, session_id: str, accept: Callable[[dict[str, Any]], bool], timeout: float = REPLY
    ) -> dict[str, Any]:
        """The ``sessions --json`` row of ``session_id`` once ``accept(row)`` holds.

        Each try is a control-endpoint round trip; the supervisor's view may lag
        the worker's by one message, so a few tries may be needed."""
        deadline = time.monotonic() + timeout
        row: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            rows = await asyncio.to_thread(ctl_json, self.runtime, "sessions")
            assert isinstance(rows, list)
            row = next((dict(r) for r in rows if r["id"] == session_id), None)
            if row is not None and accept(row):
                return row
        raise AssertionError(f"session {session_id}: no matching row in {timeout:g} s: {row}")

    async def status(
        self, accept: Callable[[dict[str, Any]], bool], timeout: float = REPLY
    ) -> dict[str, Any]:
        """The ``status --json`` reply once ``accept(status)`` holds."""
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            reply = await asyncio.to_thread(ctl_json, self.runtime, "status")
            assert isinstance(reply, dict)
            status = dict(reply)
            if accept(status):
                return status
        raise AssertionError(f"no matching status in {timeout:g} s: {status}")

    async def worker_pid(self, session_id: str) -> int:
        row = await self.session_row(
            session_id, lambda r: r["state"] == "running" and r["worker_pid"] is not None
        )
        return int(row["worker_pid"])

    def log_lines(self, fragment: str) -> list[str]:
        """The supervisor's (and its workers') stderr lines containing ``fragment``."""
        return [line for line in self.supervisor.stderr_lines if fragment in line]


@contextlib.contextmanager
def running_device(
    workdir: Path, device_id: str = "hostile-dev", signal_args: Sequence[str] = ()
) -> Iterator[HostileDevice]:
    """Start a signaling server and a device exposing ``web``, ``flood`` and
    ``stalled``; stop them (by pid) on exit."""
    secret = secrets.token_hex(32)
    web = WebService()
    threading.Thread(target=web.serve_forever, daemon=True).start()
    flood = FloodService()
    stalled = StalledService()
    children: list[Child] = []
    runtime = Path(tempfile.mkdtemp(prefix="tunnelctl-hostile-", dir=workdir))
    try:
        signal_child = Child.tunnelctl(
            ["signal", "--port", "0", *signal_args], env={"TUNNEL_SECRET": secret}, name="signal"
        )
        children.append(signal_child)
        url = signal_child.wait_line("listening ", READY).split()[1]
        tunnel = Tunnel(secret, url, web, children, [str(runtime)])
        supervisor = Child.tunnelctl(
            [
                "start",
                "--runtime-dir",
                str(runtime),
                "--signal",
                url,
                "--device",
                device_id,
                "--expose",
                f"web=http://127.0.0.1:{web.port}",
                "--expose",
                f"flood=tcp://127.0.0.1:{flood.port}",
                "--expose",
                f"stalled=tcp://127.0.0.1:{stalled.port}",
                *LOOPBACK,
            ],
            env={"TUNNEL_TOKEN": tunnel.token(device_id, "device")},
            name=f"device {device_id}",
        )
        children.append(supervisor)
        supervisor.wait_line("registered ", READY)
        yield HostileDevice(tunnel, device_id, supervisor, signal_child, runtime, flood, stalled)
    finally:
        for child in reversed(children):
            child.stop()
        web.shutdown()
        web.server_close()
        flood.close()
        stalled.close()


# -- the client ---------------------------------------------------------------------


class StreamWasReset(AssertionError):
    """The worker reset a stream the test expected to complete."""

    def __init__(self, reset: Reset) -> None:
        super().__init__(f"stream {reset.stream_id} reset: {reset.code!r} {reset.reason}")
        self.reset = reset


class HostileClient:
    """A client session negotiated like ``workers/client.py``, then driven by hand.

    Use it through :func:`hostile_client`, which opens and closes it. Streams are
    numbered by :meth:`next_stream_id` (odd, increasing: what the protocol
    requires of a client); every frame the worker sends is kept, in order, in
    :attr:`frames`, and per stream.
    """

    def __init__(self, device: HostileDevice, client: str, token: str | None = None) -> None:
        self.device = device
        self.session_id = new_session_id()
        self.link = SignalingLink(
            device.tunnel.signal_url,
            token or device.token(client),
            self._on_signal,
            fail_fast=True,
        )
        self.peer: PeerSession | None = None
        self.worker_pid = 0  # the worker process serving the session, once running
        self.channel: RTCDataChannel | None = None
        self.frames: list[Frame] = []
        self.violations: list[str] = []  # the worker broke PROTOCOL.md §2
        self._by_stream: dict[int, list[Frame]] = {}
        self._read: dict[int, int] = {}  # per stream: frames already consumed by readers
        self._credit: dict[int, int] = {}  # what the worker may still send us, per stream
        self._received: dict[int, int] = {}  # DATA bytes received, per stream
        self._last_id = -1
        self._arrived = asyncio.Event()
        self._channel_closed = asyncio.Event()
        self._ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._tasks = TaskSet(log)

    # -- set-up and tear-down --------------------------------------------------------

    async def open(
        self, timeout: float = READY, *, first: Callable[[], None] | None = None
    ) -> None:
        """Ask for the session, answer the device's offer and wait for the channel,
        then for ``sessions --json`` to show the session running (which gives
        :attr:`worker_pid`). With ``first``, call it the moment the channel
        opens, and do not wait for the supervisor."""
        self.link.start()
        await self.link.wait_up(timeout)
        peer = PeerSession(self.session_id, self.link.send)
        self.peer = peer

        def on_channel(channel: RTCDataChannel) -> None:
            # Called in the same callback as PeerSession's own listener, before
            # anything awaiting wait_open resumes: no message can come unheard.
            self.channel = channel
            channel.on("message", self._on_message)
            channel.on("close", self._on_channel_close)
            if first is not None:
                first()

        peer.pc.on("datachannel", on_channel)
        await self.link.send(SessionRequest(session=self.session_id, device=self.device.device_id))
        await peer.wait_open(timeout)
        if first is None:
            self.worker_pid = await self.device.worker_pid(self.session_id)

    async def close(self) -> None:
        peer, self.peer = self.peer, None
        if peer is not None:
            if not self._ended.done():
                with contextlib.suppress(Exception):
                    await self.link.send(SessionEnd(session=self.session_id, reason="test over"))
            await peer.close()
        await self.link.close()
        await self._tasks.cancel_all()

    # -- output ------------------------------------------------------------------------

    def next_stream_id(self) -> int:
        """The next valid client stream id (odd, above every id used so far)."""
        self._last_id += 2
        return self._last_id

    def send(self, message: bytes | str) -> None:
        """One DataChannel message, as is (binary for bytes, text for str)."""
        assert self.channel is not None
        for frame in _frames_we_can_parse(message):
            if isinstance(frame, Open | OpenHttp):
                self._credit[frame.stream_id] = INITIAL_WINDOW
                self._received[frame.stream_id] = 0
            elif isinstance(frame, Window) and frame.stream_id in self._credit:
                self._credit[frame.stream_id] += frame.increment
        self.channel.send(message)

    def send_frames(self, *frames: Frame | bytes) -> None:
        """Valid frames and hand-built bytes, concatenated into one message."""
        self.send(b"".join(f if isinstance(f, bytes) else encode_frames([f]) for f in frames))

    def grant(self, stream_id: int, increment: int) -> None:
        self.send_frames(Window(stream_id, increment))

    def stop_reading(self) -> None:
        """From now on, drop every DATA chunk the device's SCTP sends us, unacknowledged.

        The device's messages then pile up in its SCTP send queue: aiortc moves a
        message from ``bufferedAmount`` onto the wire only once everything before
        it was acknowledged, so the worker sees a channel that never drains —
        a peer that sends but does not read."""
        assert self.peer is not None and self.peer.pc.sctp is not None

        async def drop(chunk: object) -> None:
            pass

        # aiortc has no switch for this; replacing the bound handler is the hook.
        self.peer.pc.sctp._receive_data_chunk = drop  # type: ignore[method-assign]

    def lift_message_size_limit(self) -> None:
        """Let our aiortc send messages of any size, as a hostile peer's SCTP would:
        aiortc refuses to send more than the remote ``max-message-size`` (its own
        SDP says 262 144) and takes 0 to mean "no limit"."""
        assert self.peer is not None and self.peer.pc.sctp is not None
        self.peer.pc.sctp._remote_max_message_size = 0

    def unacknowledged_bytes(self) -> int:
        """Bytes we sent that the device's SCTP has not acknowledged yet."""
        assert self.peer is not None and self.peer.pc.sctp is not None and self.channel
        sctp = self.peer.pc.sctp
        queued = [*sctp._sent_queue, *sctp._outbound_queue]
        return self.channel.bufferedAmount + sum(len(chunk.user_data) for chunk in queued)

    async def wait_sent(self, timeout: float = REPLY) -> None:
        """Wait until everything we sent has left our ``bufferedAmount``: every
        message but the last one was acknowledged by the device's SCTP (and so
        handed to the worker's bridge)."""
        channel = self.channel
        assert channel is not None
        if channel.bufferedAmount == 0:
            return
        drained = asyncio.Event()
        channel.bufferedAmountLowThreshold = 0
        channel.once("bufferedamountlow", drained.set)
        async with asyncio.timeout(timeout):
            while channel.bufferedAmount and not self._channel_closed.is_set():
                await _first(drained.wait(), self._channel_closed.wait())

    # -- input ----------------------------------------------------------------------------

    @property
    def channel_closed(self) -> bool:
        return self._channel_closed.is_set()

    @property
    def ended(self) -> bool:
        """Whether the device ended the session (``session_end`` through signaling)."""
        return self._ended.done()

    def received_bytes(self, stream_id: int) -> int:
        return self._received.get(stream_id, 0)

    async def next_frame(self, stream_id: int, timeout: float = REPLY) -> Frame:
        """The next frame the worker sent on ``stream_id`` (each is returned once)."""
        frames = self._by_stream.setdefault(stream_id, [])
        await self._wait(lambda: len(frames) > self._read.get(stream_id, 0), timeout)
        index = self._read.get(stream_id, 0)
        self._read[stream_id] = index + 1
        return frames[index]

    async def expect_reset(self, stream_id: int, code: ResetCode, timeout: float = REPLY) -> Reset:
        """Skip the stream's DATA/FIN and return its RESET; fail if it is not ``code``."""
        while True:
            frame = await self.next_frame(stream_id, timeout)
            if isinstance(frame, Reset):
                assert frame.code == code, f"expected RESET {code!r}, got {frame}"
                return frame
            assert isinstance(frame, Data | Fin), f"unexpected {frame} while waiting for RESET"

    async def wait_received(self, stream_id: int, count: int, timeout: float = REPLY) -> None:
        """Wait until at least ``count`` DATA bytes arrived on ``stream_id``."""
        await self._wait(lambda: self.received_bytes(stream_id) >= count, timeout)

    async def read_stream(
        self, stream_id: int, *, grant: bool = True, timeout: float = REPLY
    ) -> bytes:
        """Collect ``stream_id``'s DATA until the worker's FIN, granting credit back
        as the reference implementation does (once half the window is consumed).
        Raises :class:`StreamWasReset` if the worker resets the stream."""
        chunks: list[bytes] = []
        consumed = 0
        while True:
            frame = await self.next_frame(stream_id, timeout)
            if isinstance(frame, Fin):
                return b"".join(chunks)
            if isinstance(frame, Reset):
                raise StreamWasReset(frame)
            assert isinstance(frame, Data), f"unexpected {frame} on stream {stream_id}"
            chunks.append(frame.data)
            consumed += len(frame.data)
            if grant and consumed >= INITIAL_WINDOW // 2:
                self.grant(stream_id, consumed)
                consumed = 0

    async def http_get(self, path: str, timeout: float = REPLY) -> bytes:
        """GET ``path`` from ``web`` on a new, well-behaved stream; return the body."""
        stream_id = self.next_stream_id()
        self.start_http_get(stream_id, path)
        return http_body(await self.read_stream(stream_id, timeout=timeout))

    def start_http_get(self, stream_id: int, path: str) -> None:
        self.send_frames(Open(stream_id, "web"), Data(stream_id, _request(path)), Fin(stream_id))

    def begin_http_get(self, path: str = "/") -> int:
        """Open a well-behaved stream to ``web`` and send the first line of a GET;
        :meth:`finish_http_get` sends the rest. Return the stream id."""
        stream_id = self.next_stream_id()
        first_line, _, _ = _request(path).partition(b"\r\n")
        self.send_frames(Open(stream_id, "web"), Data(stream_id, first_line + b"\r\n"))
        return stream_id

    async def finish_http_get(self, stream_id: int, path: str = "/") -> bytes:
        _, _, rest = _request(path).partition(b"\r\n")
        self.send_frames(Data(stream_id, rest), Fin(stream_id))
        return http_body(await self.read_stream(stream_id))

    async def probe(self, timeout: float = REPLY) -> list[Frame]:
        """Send a frame for a never-opened stream and wait for its RESET
        ``UNKNOWN_STREAM``; return the frames the worker sent meanwhile, on any
        stream except the probe's. The channel is ordered, so whatever the worker
        answered to messages sent before the probe is in that list."""
        mark = len(self.frames)
        stream_id = self._last_id + 2 + 1000  # above every id used: never opened
        self.send_frames(Fin(stream_id))
        reset = await self.expect_reset(stream_id, ResetCode.UNKNOWN_STREAM, timeout)
        index = self.frames.index(reset, mark)
        return [f for f in self.frames[mark:index] if f.stream_id != stream_id]

    async def wait_ended(self, timeout: float = REPLY) -> str:
        """The ``session_end`` reason the device sent through signaling."""
        return await asyncio.wait_for(asyncio.shield(self._ended), timeout)

    async def wait_channel_closed(self, timeout: float = REPLY) -> None:
        await asyncio.wait_for(self._channel_closed.wait(), timeout)

    # -- internals --------------------------------------------------------------------------

    async def _wait(self, predicate: Callable[[], bool], timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._wait_until(predicate)
        except TimeoutError:
            raise AssertionError(
                f"nothing expected arrived in {timeout:g} s; last frames: {self.frames[-5:]}; "
                f"violations: {self.violations}; "
                f"device log: {self.device.supervisor.stderr_tail(8)}"
            ) from None

    async def _wait_until(self, predicate: Callable[[], bool]) -> None:
        if True:
            while not predicate():
                if self._channel_closed.is_set():
                    raise AssertionError(f"the channel closed; session end: {self._ended_reason()}")
                self._arrived.clear()
                await self._arrived.wait()

    def _ended_reason(self) -> str | None:
        if self._ended.done() and not self._ended.exception():
            return self._ended.result()
        return None

    def _on_message(self, message: bytes | str) -> None:
        if isinstance(message, str):
            self.violations.append(f"text message from the worker: {message[:80]!r}")
        else:
            try:
                frames = decode_message(message)
            except RemoteProtocolError as exc:
                self.violations.append(f"undecodable message from the worker: {exc}")
                frames = []
            for frame in frames:
                self._check_credit(frame)
                self.frames.append(frame)
                self._by_stream.setdefault(frame.stream_id, []).append(frame)
        self._arrived.set()

    def _check_credit(self, frame: Frame) -> None:
        if isinstance(frame, Open):
            self.violations.append(f"the device opened stream {frame.stream_id}")
        elif isinstance(frame, Data):
            if frame.stream_id not in self._credit:
                self.violations.append(f"DATA on stream {frame.stream_id} we never opened")
                return
            self._credit[frame.stream_id] -= len(frame.data)
            self._received[frame.stream_id] += len(frame.data)
            if self._credit[frame.stream_id] < 0:
                self.violations.append(f"DATA beyond our credit on stream {frame.stream_id}")

    def _on_channel_close(self) -> None:
        self._channel_closed.set()
        self._arrived.set()

    def _on_signal(self, message: SignalingMessage) -> None:
        peer = self.peer
        if isinstance(message, Error):
            if not self._ended.done():
                self._ended.set_exception(AssertionError(f"signaling error: {message}"))
            return
        if peer is None or getattr(message, "session", None) != self.session_id:
            return
        if isinstance(message, Offer):
            self._tasks.spawn(peer.handle_offer(message.sdp), name="answer")
        elif isinstance(message, Candidate):
            self._tasks.spawn(peer.handle_candidate(message.candidate), name="candidate")
        elif isinstance(message, SessionEnd) and not self._ended.done():
            self._ended.set_result(message.reason)


@contextlib.asynccontextmanager
async def hostile_client(
    device: HostileDevice, client: str, timeout: float = READY, token: str | None = None
) -> AsyncIterator[HostileClient]:
    """A :class:`HostileClient` of ``device`` with an open DataChannel; closed on exit."""
    hostile = HostileClient(device, client, token)
    try:
        await hostile.open(timeout)
        yield hostile
    finally:
        await hostile.close()


def _frames_we_can_parse(message: bytes | str) -> list[Frame]:
    """The frames of a message we send, for our own credit bookkeeping; hostile
    messages that do not decode are not ours to account."""
    if isinstance(message, str):
        return []
    try:
        return decode_message(message)
    except RemoteProtocolError:
        return []


async def _first(*aws: Any) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: device\r\nConnection: close\r\n\r\n".encode()


def http_body(response: bytes) -> bytes:
    """The body of a ``Content-Length`` HTTP/1.1 response (checked complete)."""
    head, _, body = response.partition(b"\r\n\r\n")
    status, *headers = head.decode("latin-1").split("\r\n")
    assert status.startswith("HTTP/1.1 200"), status
    lengths = [
        h.split(":", 1)[1].strip() for h in headers if h.lower().startswith("content-length:")
    ]
    assert lengths and int(lengths[0]) == len(body), (lengths, len(body))
    return body
