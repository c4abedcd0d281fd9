"""Sans-I/O stream multiplexer: PROTOCOL.md §2.3-2.6, over one RFC 8831 DataChannel.

Many TCP connections share one ordered, reliable DataChannel; each is a *stream*
with an id (§2.3), per-direction credit-based flow control (§2.4) and a small
state machine (§2.5). This module does no I/O: the adapter (``workers/``) feeds
it what the DataChannel received and sends what it asks for.

How to drive a :class:`Multiplexer`:

* Every DataChannel message received goes to :meth:`~Multiplexer.receive_message`.
  A :class:`~protocol.errors.RemoteProtocolError` out of it is a session error
  (§2.6): close the DataChannel and log the reason.
* Then drain :meth:`~Multiplexer.events` and act on each event, in order:
  :class:`StreamOpened` (connect to the service, or :meth:`~Multiplexer.reset_stream`
  with ``UNKNOWN_SERVICE``), :class:`DataReceived` (write to TCP and, once written,
  :meth:`~Multiplexer.acknowledge` it; that returns credit to the peer),
  :class:`StreamEnded` (half-close TCP), :class:`StreamReset` (abort TCP).
* Local actions: :meth:`~Multiplexer.open_stream`, :meth:`~Multiplexer.send_data`
  (any amount; the mux frames it within credit), :meth:`~Multiplexer.send_fin`,
  :meth:`~Multiplexer.reset_stream`. Stop reading a TCP socket while
  :meth:`~Multiplexer.pending_bytes` of its stream is high: that is how a slow
  peer pushes back on a fast local sender.
* HTTP streams (§2.8): the client opens one with
  :meth:`~Multiplexer.open_http_stream` and gets :class:`HeadReceived` before the
  response's data; the device gets :class:`HttpStreamOpened` and answers with
  :meth:`~Multiplexer.send_head` before any data. Otherwise they are streams
  like the others (same events, credit, FIN and RESET).
* After any call, while :meth:`~Multiplexer.wants_to_send` is true, send every
  message of :meth:`~Multiplexer.data_to_send` on the DataChannel (pass
  ``max_bytes`` to respect the channel's buffered amount).

Guarantees: every message returned is at most ``max_message_size`` bytes and
holds whole frames; a stream never sends more DATA than its credit; received
data is never buffered here (it is handed out in :class:`DataReceived`, and the
peer can only have ``initial_window`` unacknowledged bytes per stream); a stream
is forgotten as soon as both its halves are closed or it is reset, so memory
stays bounded however many streams a session carries; and the RESETs that
answer the peer (its invalid frames, its streams we refuse or reset) wait here
at most ``max_queued_resets`` at a time: a peer that keeps provoking them while
they cannot be sent (it does not read the channel) gets a session error (§2.6)
rather than making us queue in proportion to what it sends.

The stream state machine is the transition table :data:`_TRANSITIONS`, §2.5 of
the spec transcribed; a local action the table lacks raises
:class:`~protocol.errors.LocalProtocolError`. States are protocol (wire) states:
``send_fin`` queues the FIN behind the stream's unsent data, and the stream
enters ``HALF_CLOSED_LOCAL`` when the FIN is framed by ``data_to_send``.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.frames import (
    HEADER_SIZE,
    INITIAL_WINDOW,
    MAX_MESSAGE_SIZE,
    MAX_PAYLOAD,
    MAX_REASON_LEN,
    MAX_STREAM_ID,
    MAX_WINDOW,
    Data,
    Fin,
    Head,
    Open,
    OpenHttp,
    Reset,
    ResetCode,
    Window,
    decode_message,
    encode_frame,
)
from protocol.http_heads import (
    HeadError,
    RequestHead,
    ResponseHead,
    decode_request_head,
    decode_response_head,
    encode_request_head,
    encode_response_head,
)

__all__ = [
    "MAX_QUEUED_RESETS",
    "DataReceived",
    "Event",
    "HeadReceived",
    "HttpStreamOpened",
    "Multiplexer",
    "Role",
    "StreamEnded",
    "StreamOpened",
    "StreamReset",
    "StreamState",
]

#: The largest frame the mux ever builds apart from DATA: a RESET with a full
#: reason. A message size below this could not carry every control frame.
_MIN_MESSAGE_SIZE: Final = HEADER_SIZE + 2 + MAX_REASON_LEN

#: RESET frames answering the peer that may wait unsent at once (§2.6): as many
#: frames as the largest message holds, so one message can never exceed it by
#: itself, however hostile; only a peer that goes on sending without reading can.
MAX_QUEUED_RESETS: Final = MAX_MESSAGE_SIZE // HEADER_SIZE

#: When a DATA chunk does not fit in the rest of the current message, fill that
#: rest only if it holds at least this many payload bytes; otherwise start a new
#: message rather than send a sliver.
_MIN_SPLIT_PAYLOAD: Final = 256


class Role(enum.Enum):
    """Which end of the session we are; it decides the parity of the ids we open."""

    CLIENT = "client"  # the answering peer: opens odd ids 1, 3, 5, ...
    DEVICE = "device"  # the offering peer: opens even ids 2, 4, 6, ...


class StreamState(enum.Enum):
    """Stream states of §2.5 (protocol states, as the frames on the wire say)."""

    OPEN = "open"
    HALF_CLOSED_LOCAL = "half_closed_local"  # our FIN is framed; the peer may still send
    HALF_CLOSED_REMOTE = "half_closed_remote"  # the peer's FIN arrived; we may still send
    CLOSED = "closed"  # both halves closed, or reset; the stream is then forgotten


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened ``stream_id`` to ``service`` and the mux accepted it."""

    stream_id: int
    service: str


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Stream data from the peer; call ``acknowledge(stream_id, len(data))`` once consumed."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer sent FIN: it will send no more data on ``stream_id``."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """``stream_id`` is dead; both halves are closed and queued data was dropped.

    ``remote`` is true when the peer sent the RESET, false when the mux reset the
    stream itself because the peer misbehaved on it (``FLOW_CONTROL``, ``PROTOCOL``).
    ``code`` is a :class:`~protocol.frames.ResetCode` or, for codes this version
    does not know, a plain int.
    """

    stream_id: int
    code: int
    reason: str
    remote: bool


@dataclass(frozen=True, slots=True)
class HttpStreamOpened:
    """The client opened HTTP stream ``stream_id`` to ``service`` with ``request``
    (§2.8); answer with :meth:`Multiplexer.send_head` or reset it."""

    stream_id: int
    service: str
    request: RequestHead


@dataclass(frozen=True, slots=True)
class HeadReceived:
    """The device's response head on HTTP stream ``stream_id``; the body follows
    as :class:`DataReceived`, ended by :class:`StreamEnded`."""

    stream_id: int
    response: ResponseHead


Event: TypeAlias = (
    StreamOpened | DataReceived | StreamEnded | StreamReset | HttpStreamOpened | HeadReceived
)


class _Input(enum.Enum):
    """What can happen to a stream: a local action or a received frame."""

    SEND_DATA = "send DATA"
    SEND_FIN = "send FIN"
    SEND_RESET = "send RESET"
    RECV_DATA = "receive DATA"
    RECV_FIN = "receive FIN"
    RECV_WINDOW = "receive WINDOW"
    RECV_RESET = "receive RESET"


class _Action(enum.Enum):
    ACCEPT = "accept"  # apply it (flow-control checks still apply to DATA/WINDOW)
    IGNORE = "ignore"  # drop it: it may have crossed our FIN or RESET in flight
    RESET_PROTOCOL = "reset"  # the peer broke this stream's state: RESET PROTOCOL


_O = StreamState.OPEN
_HL = StreamState.HALF_CLOSED_LOCAL
_HR = StreamState.HALF_CLOSED_REMOTE
_C = StreamState.CLOSED

#: §2.5 as a table: (state, input) -> (action, next state). A missing entry is an
#: illegal local action (only SEND_DATA / SEND_FIN after our FIN or on a closed
#: stream); every received frame has an entry, because the peer cannot be trusted
#: to be legal and each case needs a decided answer.
_TRANSITIONS: Final[Mapping[tuple[StreamState, _Input], tuple[_Action, StreamState]]] = {
    (_O, _Input.SEND_DATA): (_Action.ACCEPT, _O),
    (_O, _Input.SEND_FIN): (_Action.ACCEPT, _HL),
    (_O, _Input.SEND_RESET): (_Action.ACCEPT, _C),
    (_O, _Input.RECV_DATA): (_Action.ACCEPT, _O),
    (_O, _Input.RECV_FIN): (_Action.ACCEPT, _HR),
    (_O, _Input.RECV_WINDOW): (_Action.ACCEPT, _O),
    (_O, _Input.RECV_RESET): (_Action.ACCEPT, _C),
    #
    (_HL, _Input.SEND_RESET): (_Action.ACCEPT, _C),
    (_HL, _Input.RECV_DATA): (_Action.ACCEPT, _HL),
    (_HL, _Input.RECV_FIN): (_Action.ACCEPT, _C),
    (_HL, _Input.RECV_WINDOW): (_Action.IGNORE, _HL),  # we send no more DATA
    (_HL, _Input.RECV_RESET): (_Action.ACCEPT, _C),
    #
    (_HR, _Input.SEND_DATA): (_Action.ACCEPT, _HR),
    (_HR, _Input.SEND_FIN): (_Action.ACCEPT, _C),
    (_HR, _Input.SEND_RESET): (_Action.ACCEPT, _C),
    (_HR, _Input.RECV_DATA): (_Action.RESET_PROTOCOL, _C),
    (_HR, _Input.RECV_FIN): (_Action.RESET_PROTOCOL, _C),
    (_HR, _Input.RECV_WINDOW): (_Action.ACCEPT, _HR),
    (_HR, _Input.RECV_RESET): (_Action.ACCEPT, _C),
    #
    (_C, _Input.SEND_RESET): (_Action.IGNORE, _C),  # reset_stream on a closed stream: no-op
    (_C, _Input.RECV_DATA): (_Action.IGNORE, _C),
    (_C, _Input.RECV_FIN): (_Action.IGNORE, _C),
    (_C, _Input.RECV_WINDOW): (_Action.IGNORE, _C),
    (_C, _Input.RECV_RESET): (_Action.IGNORE, _C),
}


def _lookup(state: StreamState, stream_id: int, what: _Input) -> tuple[_Action, StreamState]:
    try:
        return _TRANSITIONS[state, what]
    except KeyError:
        raise LocalProtocolError(
            f"cannot {what.value} on stream {stream_id} in state {state.name}"
        ) from None


@dataclass(slots=True, eq=False)
class _Stream:
    """Per-stream bookkeeping; lives only while the stream is not closed."""

    stream_id: int
    state: StreamState
    send_credit: int  # DATA bytes we may still send (peer's grants minus what we framed)
    # Receive side. Invariant, the heart of §2.4:
    #   recv_credit + unacked + consumed + window_due == initial_window
    # so the peer can never make us (or the app) hold more than the window.
    recv_credit: int  # DATA bytes the peer may still send
    unacked: int = 0  # handed to the app in DataReceived, not yet acknowledged
    consumed: int = 0  # acknowledged, not yet worth a WINDOW (under half the window)
    window_due: int = 0  # decided to grant, WINDOW not framed yet
    send_queue: deque[bytes] = field(default_factory=deque)
    send_offset: int = 0  # bytes of send_queue[0] already framed
    queued: int = 0  # unframed bytes in send_queue (minus send_offset)
    fin_requested: bool = False  # send_fin was called; FIN goes out after the queue drains
    awaiting_head: bool = False  # client's HTTP stream: the device's HEAD has not come yet
    head_due: bool = False  # device's HTTP stream: send_head has not been called yet

    def take(self, n: int) -> bytes:
        """Remove and return the next ``n`` (<= queued) bytes of the send queue."""
        parts: list[bytes] = []
        need = n
        while need:
            head = self.send_queue[0]
            available = len(head) - self.send_offset
            if available <= need:
                parts.append(head[self.send_offset :] if self.send_offset else head)
                self.send_queue.popleft()
                self.send_offset = 0
                need -= available
            else:
                parts.append(head[self.send_offset : self.send_offset + need])
                self.send_offset += need
                need = 0
        self.queued -= n
        return parts[0] if len(parts) == 1 else b"".join(parts)


class _MessagePacker:
    """Packs encoded frames into messages of at most ``max_message_size`` bytes,
    stopping once the total would exceed ``max_bytes`` (after the first frame)."""

    def __init__(self, max_message_size: int, max_bytes: int | None) -> None:
        self._max_message_size = max_message_size
        self._max_bytes = max_bytes
        self._messages: list[bytes] = []
        self._current: list[bytes] = []
        self._current_size = 0
        self._total = 0

    def fits(self, size: int) -> bool:
        """Whether a frame of ``size`` bytes stays within ``max_bytes``."""
        # The first frame always fits: a caller with a tiny budget must still make
        # progress, or a frame larger than its budget would never leave.
        return self._max_bytes is None or self._total == 0 or self._total + size <= self._max_bytes

    def data_capacity(self, want: int) -> int:
        """How many payload bytes (<= ``want``) the next DATA frame may carry; 0: none."""
        capacity = min(want, self._max_message_size - HEADER_SIZE)
        if self._max_bytes is not None:
            budget = self._max_bytes - self._total - HEADER_SIZE
            if self._total == 0:
                budget = max(budget, 1)
            capacity = min(capacity, budget)
            if capacity <= 0:
                return 0
        room = self._max_message_size - self._current_size - HEADER_SIZE
        if capacity > room and room >= min(capacity, _MIN_SPLIT_PAYLOAD):
            capacity = room  # fill this message rather than open a new one
        return capacity

    def add(self, encoded: bytes) -> None:
        if self._current_size + len(encoded) > self._max_message_size:
            self._close_message()
        self._current.append(encoded)
        self._current_size += len(encoded)
        self._total += len(encoded)

    def messages(self) -> list[bytes]:
        self._close_message()
        return self._messages

    def _close_message(self) -> None:
        if self._current:
            self._messages.append(b"".join(self._current))
            self._current = []
            self._current_size = 0


class Multiplexer:
    """One side of a tunnel session's stream multiplexing (§2.3-2.6); no I/O.

    ``initial_window`` is both directions' starting credit; the spec fixes it at
    262 144, so change it only where both peers agree (tests). ``max_streams``
    bounds the streams alive at once, ours and the peer's together.
    ``max_message_size`` bounds the messages we send (the peer's SCTP
    ``max-message-size`` may be lower than 65 536); received messages are held to
    the spec's 65 536. ``max_queued_resets`` bounds the RESETs answering the peer
    that :meth:`data_to_send` has not yet returned (:attr:`queued_resets`); a frame
    received while that many wait is a session error (§2.6).
    """

    def __init__(
        self,
        role: Role,
        *,
        initial_window: int = INITIAL_WINDOW,
        max_streams: int = 1024,
        max_message_size: int = MAX_MESSAGE_SIZE,
        max_queued_resets: int = MAX_QUEUED_RESETS,
    ) -> None:
        if not isinstance(role, Role):
            raise LocalProtocolError(f"role must be a Role, not {role!r}")
        if not 1 <= initial_window <= MAX_WINDOW:
            raise LocalProtocolError(f"initial_window {initial_window} out of 1..{MAX_WINDOW}")
        if max_streams < 1:
            raise LocalProtocolError(f"max_streams must be >= 1, not {max_streams}")
        if max_queued_resets < 1:
            raise LocalProtocolError(f"max_queued_resets must be >= 1, not {max_queued_resets}")
        if not _MIN_MESSAGE_SIZE <= max_message_size <= MAX_MESSAGE_SIZE:
            raise LocalProtocolError(
                f"max_message_size {max_message_size} "
                f"out of {_MIN_MESSAGE_SIZE}..{MAX_MESSAGE_SIZE}"
            )
        self._role = role
        self._initial_window = initial_window
        # Grant credit back once half the window is consumed (§2.4): fewer WINDOW
        # frames than per-read grants, and the sender never stalls on a full window.
        self._grant_threshold = max(1, initial_window // 2)
        self._max_streams = max_streams
        self._max_message_size = max_message_size
        self._max_data_payload = min(MAX_PAYLOAD, max_message_size - HEADER_SIZE)
        self._max_queued_resets = max_queued_resets

        self._streams: dict[int, _Stream] = {}
        # Only the highest id per parity is remembered, never the set of closed
        # ids: ids below it that are not in _streams are closed (§2.3).
        self._next_local_id = 1 if role is Role.CLIENT else 2
        self._last_remote_id = 0
        self._events: list[Event] = []
        # OPEN and RESET frames, in the order they were decided, each with whether
        # it answers the peer (counted in _queued_resets, capped: §2.6). WINDOW
        # grants are kept per stream (_grants) so a grant for a stream that closes
        # meanwhile simply disappears.
        self._control: deque[tuple[Open | OpenHttp | Head | Reset, bool]] = deque()
        self._queued_resets = 0
        self._grants: dict[int, None] = {}  # ordered set of ids with window_due > 0
        # Round-robin ring (ordered set) of streams with a frame ready: DATA with
        # credit, or a FIN whose data has all been framed.
        self._ready: dict[int, None] = {}

    # -- inspection -----------------------------------------------------------

    @property
    def role(self) -> Role:
        return self._role

    @property
    def stream_count(self) -> int:
        """Streams not yet closed (counted against ``max_streams``)."""
        return len(self._streams)

    def stream_state(self, stream_id: int) -> StreamState | None:
        """The protocol state of ``stream_id``; ``None`` once closed (a closed
        stream is forgotten at once) or if it never existed."""
        stream = self._streams.get(stream_id)
        return None if stream is None else stream.state

    def pending_bytes(self, stream_id: int) -> int:
        """Bytes given to :meth:`send_data` and not yet framed (0 if not open).

        Adapters stop reading the stream's TCP socket while this is high."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None else stream.queued

    @property
    def queued_resets(self) -> int:
        """RESETs answering the peer (its invalid frames, the streams it opened
        that we refuse or reset) that :meth:`data_to_send` has not returned yet.

        A frame received while ``max_queued_resets`` wait is a session error, so
        the peer alone never pushes it past the cap; the application's resets of
        the peer's streams may add to it until the next message arrives."""
        return self._queued_resets

    def wants_to_send(self) -> bool:
        """Whether :meth:`data_to_send` would return something now."""
        return bool(self._control or self._grants or self._ready)

    # -- local actions --------------------------------------------------------

    def open_stream(self, service: str) -> int:
        """Open a stream to the peer's ``service``; return its id.

        The OPEN is queued: call :meth:`data_to_send`. Data may be queued with
        :meth:`send_data` right away; it follows the OPEN.
        Raises :class:`LocalProtocolError` if ``service`` is not a valid name, if
        ``max_streams`` streams are open, or if the id space is exhausted.
        """
        stream_id = self._next_local_id
        if stream_id > MAX_STREAM_ID:
            raise LocalProtocolError("stream ids exhausted for this session")
        frame = Open(stream_id, service)  # validates the service name
        if len(self._streams) >= self._max_streams:
            raise LocalProtocolError(f"cannot open a stream: {self._max_streams} streams open")
        self._next_local_id += 2
        self._streams[stream_id] = self._new_stream(stream_id)
        self._queue(frame)
        return stream_id

    def open_http_stream(self, service: str, request: RequestHead) -> int:
        """Open an HTTP stream (§2.8) to the device's ``service``; return its id.

        Client side only. The request body follows with :meth:`send_data` and
        ends with :meth:`send_fin`; the response comes as :class:`HeadReceived`,
        then :class:`DataReceived` and :class:`StreamEnded`. Raises as
        :meth:`open_stream`, and if the head is too large to send.
        """
        if self._role is not Role.CLIENT:
            raise LocalProtocolError("only the client opens HTTP streams")
        stream_id = self._next_local_id
        if stream_id > MAX_STREAM_ID:
            raise LocalProtocolError("stream ids exhausted for this session")
        frame = OpenHttp(stream_id, service, encode_request_head(request))
        if len(self._streams) >= self._max_streams:
            raise LocalProtocolError(f"cannot open a stream: {self._max_streams} streams open")
        self._next_local_id += 2
        stream = self._new_stream(stream_id)
        stream.awaiting_head = True
        self._streams[stream_id] = stream
        self._queue(frame)
        return stream_id

    def send_head(self, stream_id: int, response: ResponseHead) -> None:
        """Answer the client's HTTP stream ``stream_id`` with ``response`` (§2.8).

        Exactly once per HTTP stream, before any :meth:`send_data` or
        :meth:`send_fin` on it. Raises :class:`LocalProtocolError` otherwise, on
        a closed stream, or if the head is too large to send.
        """
        stream = self._require_stream(stream_id, _Input.SEND_DATA)
        _lookup(stream.state, stream_id, _Input.SEND_DATA)  # legality only
        if not stream.head_due:
            raise LocalProtocolError(f"stream {stream_id} is not an HTTP stream awaiting its HEAD")
        frame = Head(stream_id, encode_response_head(response))
        stream.head_due = False
        # Control frames leave before any DATA, so the HEAD precedes the body.
        self._queue(frame)

    def send_data(self, stream_id: int, data: bytes) -> None:
        """Queue ``data`` (any length) on ``stream_id``; it is framed by
        :meth:`data_to_send` as credit allows.

        Raises :class:`LocalProtocolError` after :meth:`send_fin`, on a closed
        stream (including one the peer reset in a message you have not yet read
        the events of: check :meth:`stream_state` first) and on an unknown id.
        """
        stream = self._require_stream(stream_id, _Input.SEND_DATA)
        _lookup(stream.state, stream_id, _Input.SEND_DATA)  # legality only: no state change
        if stream.fin_requested:  # FIN queued but not framed: the table still says OPEN
            raise LocalProtocolError(f"cannot send DATA on stream {stream_id} after send_fin")
        if stream.head_due:
            raise LocalProtocolError(f"cannot send DATA on stream {stream_id} before send_head")
        if not data:
            return
        # Copy mutable buffers: the caller may reuse them before the data is framed.
        stream.send_queue.append(bytes(data))
        stream.queued += len(data)
        self._update_ready(stream)

    def send_fin(self, stream_id: int) -> None:
        """Close our send half of ``stream_id``: FIN follows all its queued data.

        Raises :class:`LocalProtocolError` if the send half is already closed (FIN
        twice, or a closed stream) or the id is unknown.
        """
        stream = self._require_stream(stream_id, _Input.SEND_FIN)
        _lookup(stream.state, stream_id, _Input.SEND_FIN)  # applied when the FIN is framed
        if stream.fin_requested:
            raise LocalProtocolError(f"cannot send FIN on stream {stream_id} twice")
        if stream.head_due:
            raise LocalProtocolError(f"cannot send FIN on stream {stream_id} before send_head")
        stream.fin_requested = True
        self._update_ready(stream)

    def reset_stream(self, stream_id: int, code: int, reason: str = "") -> None:
        """Abort ``stream_id`` with RESET ``code``: unsent data is dropped and the
        RESET goes out ahead of all DATA. No event is emitted for it.

        A no-op on a closed stream (it may have been closed by the peer
        meanwhile). Raises :class:`LocalProtocolError` for an invalid code or
        reason, or an id that was never opened.
        """
        frame = Reset(stream_id, code, reason)  # validates code and reason
        stream = self._streams.get(stream_id)
        if stream is None:
            self._require_opened(stream_id, _Input.SEND_RESET)
            return  # closed: no-op (§2.5)
        self._apply(stream, _Input.SEND_RESET)
        # Resetting a stream the peer opened answers its OPEN (refused, no such
        # service...): the peer controls how many of those there are.
        self._close(stream, frame, answers_peer=not self._is_local_id(stream_id))

    def acknowledge(self, stream_id: int, n: int) -> None:
        """The application consumed ``n`` bytes of ``stream_id``'s received data.

        Once half the window has been consumed, a WINDOW returning that credit is
        queued (call :meth:`data_to_send`). A no-op on a closed stream. Raises
        :class:`LocalProtocolError` if ``n`` is negative or more than was received
        and not yet acknowledged.
        """
        if n < 0:
            raise LocalProtocolError(f"cannot acknowledge {n} bytes")
        stream = self._streams.get(stream_id)
        if stream is None:
            self._require_opened(stream_id, None)
            return
        if n > stream.unacked:
            raise LocalProtocolError(
                f"cannot acknowledge {n} bytes on stream {stream_id}: "
                f"only {stream.unacked} received and not yet acknowledged"
            )
        stream.unacked -= n
        stream.consumed += n
        # After the peer's FIN no more data comes: credit would be wasted bytes.
        receiving = stream.state in (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)
        if receiving and stream.consumed >= self._grant_threshold:
            stream.window_due += stream.consumed
            stream.consumed = 0
            self._grants[stream_id] = None

    # -- input ----------------------------------------------------------------

    def receive_message(self, message: bytes) -> None:
        """Process one DataChannel message; then drain :meth:`events` and
        :meth:`data_to_send`.

        Raises :class:`RemoteProtocolError` on a session error (§2.6): the session
        must end. Errors that concern one stream reset that stream (a
        :class:`StreamReset` with ``remote=False`` and a queued RESET).
        """
        for frame in decode_message(message):
            if self._queued_resets >= self._max_queued_resets:
                # Checked per frame, so the queue never grows past the cap by more
                # than the one reply this frame may add.
                raise RemoteProtocolError(
                    f"{self._queued_resets} RESET frames answering the peer wait to be "
                    "sent and it keeps sending: it does not read the channel"
                )
            if isinstance(frame, Open | OpenHttp):
                self._receive_open(frame)
                continue
            stream = self._streams.get(frame.stream_id)
            if stream is None:
                self._receive_for_unknown(frame)
            elif isinstance(frame, Data):
                self._receive_data(stream, frame)
            elif isinstance(frame, Fin):
                self._receive_fin(stream)
            elif isinstance(frame, Window):
                self._receive_window(stream, frame)
            elif isinstance(frame, Head):
                self._receive_head(stream, frame)
            else:
                self._receive_reset(stream, frame)

    def events(self) -> list[Event]:
        """Return and forget the events produced since the last call, in order."""
        events, self._events = self._events, []
        return events

    # -- output ---------------------------------------------------------------

    def data_to_send(self, max_bytes: int | None = None) -> list[bytes]:
        """Return the messages to send on the DataChannel, in order, and forget them.

        Each message is at most ``max_message_size`` bytes of whole frames.
        OPEN/RESET and WINDOW frames come first, then DATA served round-robin, one
        frame per stream per turn, within each stream's credit; a stream's FIN
        follows its last DATA. With ``max_bytes``, stops before the total would
        exceed it, but returns at least one frame if anything is sendable; what is
        left stays queued for the next call (see :meth:`wants_to_send`).
        """
        if max_bytes is not None and max_bytes < 0:
            raise LocalProtocolError(f"max_bytes must be >= 0, not {max_bytes}")
        packer = _MessagePacker(self._max_message_size, max_bytes)
        if self._pack_control(packer):
            self._pack_streams(packer)
        return packer.messages()

    def _pack_control(self, packer: _MessagePacker) -> bool:
        """Pack control frames; return whether all of them fit."""
        while self._control:
            frame, answers_peer = self._control[0]
            encoded = encode_frame(frame)
            if not packer.fits(len(encoded)):
                return False
            self._control.popleft()
            if answers_peer:
                self._queued_resets -= 1
            packer.add(encoded)
        while self._grants:
            stream_id = next(iter(self._grants))
            stream = self._streams[stream_id]
            encoded = encode_frame(Window(stream_id, stream.window_due))
            if not packer.fits(len(encoded)):
                return False
            del self._grants[stream_id]
            # Credit is extended when the grant leaves, not when it is decided: the
            # peer may not use it earlier, so DATA beyond the old credit is a violation.
            stream.recv_credit += stream.window_due
            stream.window_due = 0
            packer.add(encoded)
        return True

    def _pack_streams(self, packer: _MessagePacker) -> None:
        while self._ready:
            stream_id = next(iter(self._ready))
            stream = self._streams[stream_id]
            if stream.queued:
                size = packer.data_capacity(
                    min(stream.queued, stream.send_credit, self._max_data_payload)
                )
                if size == 0:
                    return
                stream.send_credit -= size
                packer.add(encode_frame(Data(stream_id, stream.take(size))))
            else:
                encoded = encode_frame(Fin(stream_id))
                if not packer.fits(len(encoded)):
                    return
                packer.add(encoded)
                if self._apply(stream, _Input.SEND_FIN) is StreamState.CLOSED:
                    self._forget(stream)
                    continue
            # Move the stream to the back of the ring: the next stream gets a turn.
            del self._ready[stream_id]
            self._update_ready(stream)

    # -- internals ------------------------------------------------------------

    def _new_stream(self, stream_id: int) -> _Stream:
        return _Stream(
            stream_id,
            StreamState.OPEN,
            send_credit=self._initial_window,
            recv_credit=self._initial_window,
        )

    def _is_local_id(self, stream_id: int) -> bool:
        return (stream_id % 2 == 1) == (self._role is Role.CLIENT)

    def _was_opened(self, stream_id: int) -> bool:
        """Whether ``stream_id`` was opened at some time (by either side)."""
        if self._is_local_id(stream_id):
            return 0 < stream_id < self._next_local_id
        return 0 < stream_id <= self._last_remote_id

    def _require_opened(self, stream_id: int, what: _Input | None) -> None:
        if not self._was_opened(stream_id):
            action = "use" if what is None else what.value + " on"
            raise LocalProtocolError(f"cannot {action} stream {stream_id}: it was never opened")

    def _require_stream(self, stream_id: int, what: _Input) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            self._require_opened(stream_id, what)
            _lookup(StreamState.CLOSED, stream_id, what)  # raises: closed streams can't send
            raise AssertionError("unreachable: the table has no local sends on CLOSED")
        return stream

    def _apply(self, stream: _Stream, what: _Input) -> StreamState:
        """Move ``stream`` along the table for ``what``; return the new state."""
        _, stream.state = _lookup(stream.state, stream.stream_id, what)
        return stream.state

    def _update_ready(self, stream: _Stream) -> None:
        """Put ``stream`` in (or at the back of) the round-robin ring if it has a
        frame to send now, or take it out."""
        has_data = stream.queued > 0 and stream.send_credit > 0
        has_fin = (
            stream.fin_requested
            and stream.queued == 0
            and stream.state in (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)
        )
        if has_data or has_fin:
            self._ready.setdefault(stream.stream_id, None)
        else:
            self._ready.pop(stream.stream_id, None)

    def _forget(self, stream: _Stream) -> None:
        del self._streams[stream.stream_id]
        self._ready.pop(stream.stream_id, None)
        self._grants.pop(stream.stream_id, None)

    def _queue(self, frame: Open | OpenHttp | Head | Reset, *, answers_peer: bool = False) -> None:
        self._control.append((frame, answers_peer))
        if answers_peer:
            self._queued_resets += 1

    def _close(
        self, stream: _Stream, reset: Reset | None = None, *, answers_peer: bool = False
    ) -> None:
        """Forget a stream the table just closed; queue ``reset`` if we send one."""
        if reset is not None:
            self._queue(reset, answers_peer=answers_peer)
        self._forget(stream)

    def _abort(self, stream: _Stream, code: ResetCode, reason: str) -> None:
        """The peer misbehaved on ``stream`` (state already CLOSED): reset it and
        tell the application."""
        self._close(stream, Reset(stream.stream_id, code, reason), answers_peer=True)
        self._events.append(StreamReset(stream.stream_id, code, reason, remote=False))

    def _receive_open(self, frame: Open | OpenHttp) -> None:
        stream_id = frame.stream_id
        if isinstance(frame, OpenHttp) and self._role is Role.CLIENT:
            raise RemoteProtocolError(
                f"OPEN_HTTP stream {stream_id}: the device opens no HTTP streams"
            )
        if self._is_local_id(stream_id):
            peer = "device" if self._role is Role.CLIENT else "client"
            parity = "even" if peer == "device" else "odd"
            raise RemoteProtocolError(
                f"OPEN stream {stream_id}: the {peer} must open {parity} stream ids"
            )
        if stream_id <= self._last_remote_id:
            raise RemoteProtocolError(
                f"OPEN stream {stream_id}: not above the peer's previous id {self._last_remote_id}"
            )
        self._last_remote_id = stream_id
        if len(self._streams) >= self._max_streams:
            self._queue(
                Reset(stream_id, ResetCode.REFUSED, f"too many streams ({self._max_streams})"),
                answers_peer=True,
            )
            return
        if isinstance(frame, OpenHttp):
            self._receive_open_http(frame)
            return
        self._streams[stream_id] = self._new_stream(stream_id)
        self._events.append(StreamOpened(stream_id, frame.service))

    def _receive_open_http(self, frame: OpenHttp) -> None:
        try:
            request = decode_request_head(frame.head)
        except HeadError as exc:
            # The id counts (it was checked above) but no stream is made: the
            # application never hears of a request it could not perform.
            self._queue(
                Reset(frame.stream_id, ResetCode.BAD_HEAD, _reason(f"bad request head: {exc}")),
                answers_peer=True,
            )
            return
        stream = self._new_stream(frame.stream_id)
        stream.head_due = True
        self._streams[frame.stream_id] = stream
        self._events.append(HttpStreamOpened(frame.stream_id, frame.service, request))

    def _receive_head(self, stream: _Stream, frame: Head) -> None:
        # HEAD is legal exactly where DATA is: it is the start of the device's data.
        action = self._receive_action(stream, _Input.RECV_DATA)
        if action is _Action.IGNORE:
            return
        if action is _Action.RESET_PROTOCOL:
            self._abort(stream, ResetCode.PROTOCOL, "HEAD after FIN")
            return
        if not stream.awaiting_head:
            self._apply(stream, _Input.SEND_RESET)
            self._abort(stream, ResetCode.PROTOCOL, "HEAD on a stream that expects none")
            return
        try:
            response = decode_response_head(frame.head)
        except HeadError as exc:
            self._apply(stream, _Input.SEND_RESET)
            self._abort(stream, ResetCode.BAD_HEAD, _reason(f"bad response head: {exc}"))
            return
        stream.awaiting_head = False
        self._events.append(HeadReceived(stream.stream_id, response))

    def _receive_for_unknown(self, frame: Data | Fin | Window | Reset | Head) -> None:
        # A closed stream's frames may have crossed our RESET or FIN: ignore them
        # (§2.3). Frames for a stream that was never opened get UNKNOWN_STREAM,
        # except a RESET, which must never be answered with a RESET (no ping-pong).
        if self._was_opened(frame.stream_id) or isinstance(frame, Reset):
            return
        self._queue(
            Reset(frame.stream_id, ResetCode.UNKNOWN_STREAM, "stream was never opened"),
            answers_peer=True,
        )

    def _receive_data(self, stream: _Stream, frame: Data) -> None:
        action = self._receive_action(stream, _Input.RECV_DATA)
        if action is _Action.IGNORE:
            return
        if action is _Action.RESET_PROTOCOL:
            self._abort(stream, ResetCode.PROTOCOL, "DATA after FIN")
            return
        if stream.awaiting_head:
            self._apply(stream, _Input.SEND_RESET)
            self._abort(stream, ResetCode.PROTOCOL, "DATA before HEAD")
            return
        size = len(frame.data)
        if size > stream.recv_credit:
            # The data is dropped, never buffered: holding it would let the peer
            # make us hold more than we granted.
            self._apply(stream, _Input.SEND_RESET)
            self._abort(
                stream,
                ResetCode.FLOW_CONTROL,
                f"DATA of {size} bytes beyond credit of {stream.recv_credit}",
            )
            return
        stream.recv_credit -= size
        stream.unacked += size
        self._events.append(DataReceived(stream.stream_id, frame.data))

    def _receive_fin(self, stream: _Stream) -> None:
        action = self._receive_action(stream, _Input.RECV_FIN)
        if action is _Action.IGNORE:
            return
        if action is _Action.RESET_PROTOCOL:
            self._abort(stream, ResetCode.PROTOCOL, "FIN after FIN")
            return
        if stream.awaiting_head:
            self._apply(stream, _Input.SEND_RESET)
            self._abort(stream, ResetCode.PROTOCOL, "FIN before HEAD")
            return
        # No more data comes: credit not yet returned will never be needed.
        self._grants.pop(stream.stream_id, None)
        stream.window_due = 0
        self._events.append(StreamEnded(stream.stream_id))
        if stream.state is StreamState.CLOSED:
            self._close(stream)

    def _receive_window(self, stream: _Stream, frame: Window) -> None:
        action = self._receive_action(stream, _Input.RECV_WINDOW)
        if action is not _Action.ACCEPT:
            return
        credit = stream.send_credit + frame.increment
        if credit > MAX_WINDOW:
            self._apply(stream, _Input.SEND_RESET)
            self._abort(
                stream,
                ResetCode.FLOW_CONTROL,
                f"WINDOW lifts credit to {credit}, above {MAX_WINDOW}",
            )
            return
        stream.send_credit = credit
        self._update_ready(stream)

    def _receive_reset(self, stream: _Stream, frame: Reset) -> None:
        if self._receive_action(stream, _Input.RECV_RESET) is not _Action.ACCEPT:
            return
        self._close(stream)
        self._events.append(StreamReset(stream.stream_id, frame.code, frame.reason, remote=True))

    def _receive_action(self, stream: _Stream, what: _Input) -> _Action:
        action, stream.state = _lookup(stream.state, stream.stream_id, what)
        return action


def _reason(text: str) -> str:
    """``text`` cut to fit a RESET reason (256 UTF-8 bytes, §2.2)."""
    return text.encode("utf-8")[:MAX_REASON_LEN].decode("utf-8", "ignore")
