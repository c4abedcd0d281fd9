"""Fuzzing the tunnel frame decoder and the multiplexer with structured-but-wrong input.

``test_protocol_frames.py`` and ``test_protocol_mux.py`` already throw random
bytes, byte-level corruptions and random well-formed frames at both. This file
adds what those cannot reach:

* **field-aware mutations** of the frame header and of each payload, checked
  against an independent reading of PROTOCOL.md §2.2/§2.6 (:func:`spec_decode`):
  the decoder must accept exactly what the spec accepts, with the same meaning;
* **a model of §2.3-2.6** (:class:`DeviceModel`) that predicts, frame by frame,
  what the device's multiplexer does with valid frames sent in valid and invalid
  orders and states — the events, the RESETs it queues and their codes, the
  WINDOW grants, the session errors — driven by a hypothesis state machine that
  interleaves them with the application's acknowledgements, FINs and resets;
* **volume**: however many hostile messages a peer sends, the multiplexer's
  buffered state stays bounded — streams by ``max_streams``, queued RESETs by
  ``max_queued_resets`` when the peer does not read, by one message's worth
  when it does — and a well-behaved peer's streams deliver their bytes intact
  among the bad frames.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.frames import (
    HEADER_SIZE,
    INITIAL_WINDOW,
    MAX_MESSAGE_SIZE,
    MAX_WINDOW,
    Data,
    Fin,
    Frame,
    Head,
    Open,
    OpenHttp,
    Reset,
    ResetCode,
    Window,
    decode_message,
    encode_frame,
    encode_frames,
)
from protocol.mux import (
    MAX_QUEUED_RESETS,
    DataReceived,
    Event,
    Multiplexer,
    Role,
    StreamEnded,
    StreamOpened,
    StreamReset,
    StreamState,
)

# -- the decoder against the spec, field by field ---------------------------------------

_SERVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

Meaning = tuple[int, int, object]  # (type, stream id, what the payload says)


def spec_decode(message: bytes) -> list[Meaning] | None:
    """PROTOCOL.md §2.1, §2.2 and §2.6 read literally, independently of
    ``protocol.frames``: the frames of a message, or ``None`` for a session error."""
    if not 1 <= len(message) <= 65536:
        return None
    frames: list[Meaning] = []
    offset = 0
    while offset < len(message):
        header = message[offset : offset + 8]
        if len(header) < 8:
            return None
        kind, flags = header[0], header[1]
        length = int.from_bytes(header[2:4], "big")
        stream_id = int.from_bytes(header[4:8], "big")
        payload = message[offset + 8 : offset + 8 + length]
        if len(payload) < length or flags != 0 or stream_id == 0:
            return None
        meaning: object
        if kind == 1:  # OPEN: service name, UTF-8, 1-64 bytes, the identifier syntax
            name = _utf8(payload)
            if name is None or not _SERVICE.fullmatch(name):
                return None
            meaning = name
        elif kind == 2:  # DATA: 1-65 528 bytes
            if not payload:
                return None
            meaning = payload
        elif kind == 3:  # FIN: empty
            if payload:
                return None
            meaning = None
        elif kind == 4:  # RESET: u16 code, UTF-8 reason of 0-256 bytes
            reason = _utf8(payload[2:])
            if len(payload) < 2 or len(payload) - 2 > 256 or reason is None:
                return None
            meaning = (int.from_bytes(payload[:2], "big"), reason)
        elif kind == 5:  # WINDOW: u32 increment, 1 ... 2**31-1
            increment = int.from_bytes(payload, "big")
            if len(payload) != 4 or not 1 <= increment <= 2**31 - 1:
                return None
            meaning = increment
        elif kind == 6:  # OPEN_HTTP (§2.8): u8 n, n-byte service name, a non-empty head
            n = payload[0] if payload else 0
            name = _utf8(payload[1 : 1 + n])
            if n == 0 or 1 + n >= len(payload) or name is None or not _SERVICE.fullmatch(name):
                return None
            meaning = (name, payload[1 + n :])
        elif kind == 7:  # HEAD (§2.8): a non-empty head
            if not payload:
                return None
            meaning = payload
        else:
            return None
        frames.append((kind, stream_id, meaning))
        offset += 8 + length
    return frames


def _utf8(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def meaning_of(frame: Frame) -> Meaning:
    match frame:
        case Open(stream_id, service):
            return (1, stream_id, service)
        case Data(stream_id, data):
            return (2, stream_id, data)
        case Fin(stream_id):
            return (3, stream_id, None)
        case Reset(stream_id, code, reason):
            return (4, stream_id, (int(code), reason))
        case Window(stream_id, increment):
            return (5, stream_id, increment)
        case OpenHttp(stream_id, service, head):
            return (6, stream_id, (service, head))
        case Head(stream_id, head):
            return (7, stream_id, head)
    raise AssertionError(frame)


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def _with_reason(code: int, reason: bytes) -> bytes:
    return code.to_bytes(2, "big") + reason


#: Payloads per frame type: valid ones and the values at and just past each limit.
PAYLOADS: dict[int, st.SearchStrategy[bytes]] = {
    1: st.one_of(
        st.from_regex(_SERVICE, fullmatch=True).map(str.encode),
        st.sampled_from(
            [b"", b"a" * 64, b"a" * 65, b"../x", b".web", b"-web", b"web\n", b"w b", b"w\x00b"]
        ),
        # Not ASCII: an accented letter, invalid UTF-8, a lone lead byte, fullwidth "web".
        st.sampled_from(["w\u00e9b".encode(), b"w\xffb", b"\xc3", "\uff57\uff45\uff42".encode()]),
    ),
    2: st.one_of(st.binary(max_size=64), st.just(b"")),
    3: st.sampled_from([b"", b"", b"\x00", b"x"]),
    4: st.one_of(
        st.sampled_from([b"", b"\x00"]),
        st.builds(
            _with_reason,
            st.sampled_from([0, 4, 7, 8, 0xFFFF]),
            st.one_of(
                st.text(max_size=20).map(str.encode),
                # 256 bytes, 257, 256 in two-byte characters, a character cut at 256.
                st.sampled_from(
                    [b"r" * 256, b"r" * 257, "\u00e9".encode() * 128, b"r" * 255 + b"\xc3"]
                ),
                # Invalid UTF-8 (a surrogate among them) and a NUL, which is valid.
                st.sampled_from([b"\xc3\x28", b"\xff", b"\xed\xa0\x80", b"\x00"]),
            ),
        ),
    ),
    5: st.one_of(
        st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**32 - 1]).map(_u32),
        st.integers(0, 2**32 - 1).map(_u32),
        st.binary(max_size=6),
    ),
    6: st.one_of(
        st.sampled_from([b"", b"\x00", b"\x00{}", b"\x03web", b"\x04web{}", b"\x03w\xffb{}"]),
        st.builds(
            lambda name, head: bytes([len(name)]) + name + head,
            st.from_regex(_SERVICE, fullmatch=True).map(str.encode),
            st.binary(max_size=8),
        ),
    ),
    7: st.one_of(st.binary(max_size=16), st.just(b"")),
}


@st.composite
def field_mutated_frames(draw: st.DrawFn) -> bytes:
    """One frame whose header fields and payload are each usually right and
    sometimes set to a boundary or wrong value."""
    kind = draw(st.sampled_from(sorted(PAYLOADS)))
    payload = draw(PAYLOADS[kind])
    wire_type = draw(
        st.one_of(st.just(kind), st.just(kind), st.sampled_from([0, 6, 7, 8, 0x81, 0xFF]))
    )
    flags = draw(st.sampled_from([0, 0, 0, 0, 1, 0x80, 0xFF]))
    stream_id = draw(st.one_of(st.integers(1, 9), st.sampled_from([0, 2**31, 2**32 - 1])))
    delta = draw(st.one_of(st.just(0), st.just(0), st.integers(-3, 3)))
    length = min(max(len(payload) + delta, 0), 0xFFFF)
    header = bytes([wire_type, flags]) + length.to_bytes(2, "big") + _u32(stream_id)
    return header + payload


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(field_mutated_frames(), min_size=1, max_size=4),
    st.one_of(st.just(b""), st.just(b""), st.binary(min_size=1, max_size=9)),
)
def test_decoder_accepts_exactly_what_the_spec_accepts(parts: list[bytes], tail: bytes) -> None:
    """Structured-but-wrong messages: the decoder and the spec read agree on every
    one, and what is accepted means what the spec says it means."""
    message = b"".join(parts) + tail
    expected = spec_decode(message)
    try:
        frames = decode_message(message)
    except RemoteProtocolError:
        assert expected is None, f"rejected a message the spec accepts: {expected}"
        return
    assert expected is not None, f"accepted a message the spec rejects: {frames}"
    assert [meaning_of(f) for f in frames] == expected


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.sampled_from(
            [
                Open(1, "web"),
                Open(3, "ssh"),
                Data(1, b"GET /"),
                Window(1, 7),
                Fin(9),
                Reset(11, 3, "x"),
            ]
        ),
        max_size=5,
    ),
    field_mutated_frames(),
    st.lists(st.sampled_from([Data(1, b"after"), Fin(1), Open(5, "web")]), max_size=3),
)
def test_a_message_that_does_not_decode_changes_nothing_in_the_mux(
    before: list[Frame], bad: bytes, after: list[Frame]
) -> None:
    """§2.6: a message is decoded whole before any frame of it is acted on, so a
    corrupt frame after good ones leaves the multiplexer exactly as it was."""
    message = encode_frames(before) + bad + encode_frames(after)
    if spec_decode(message) is not None:
        return  # the mutation happened to produce a valid frame
    device = Multiplexer(Role.DEVICE, initial_window=100)
    device.receive_message(encode_frames([Open(1, "web"), Data(1, b"hello")]))
    device.events()
    device.data_to_send()
    with pytest.raises(RemoteProtocolError):
        device.receive_message(message)
    assert device.events() == []
    assert not device.wants_to_send()
    assert device.queued_resets == 0
    assert device.stream_count == 1 and device.stream_state(1) is StreamState.OPEN
    # Stream 1's credit is what it was: the window less the five bytes it received.
    device.receive_message(encode_frame(Data(1, bytes(95))))
    assert [type(e) for e in device.events()] == [DataReceived]
    device.receive_message(encode_frame(Data(1, b"!")))
    assert [(type(e), getattr(e, "code", None)) for e in device.events()] == [
        (StreamReset, ResetCode.FLOW_CONTROL)
    ]


# -- the multiplexer against a model of §2.3-2.6 -------------------------------------------

WINDOW = 64  # small, so credit runs out within a few frames
THRESHOLD = WINDOW // 2  # the reference implementation grants once half is consumed
MAX_STREAMS = 3
MAX_RESETS = 6  # a small cap, so the state machine meets it

#: What the model says one frame does. ``event`` is compared without reasons.
EventKey = tuple[str, int, int | None, bool | None]


@dataclass
class StreamModel:
    """A client stream as the device's multiplexer should see it."""

    recv_credit: int = WINDOW  # DATA the client may still send
    send_credit: int = WINDOW  # DATA the device may still send (it sends none here)
    unacked: int = 0
    consumed: int = 0
    window_due: int = 0
    fin_received: bool = False  # the client's FIN arrived
    fin_requested: bool = False  # the device app called send_fin
    fin_sent: bool = False  # ... and data_to_send framed it

    @property
    def state(self) -> StreamState:
        if self.fin_sent:
            return StreamState.HALF_CLOSED_LOCAL
        return StreamState.HALF_CLOSED_REMOTE if self.fin_received else StreamState.OPEN


class SessionError(Exception):
    """The model's verdict: this frame is a session error (§2.6)."""


@dataclass
class DeviceModel:
    """§2.3-2.6 from the device's side, with the client played by the test."""

    last_open: int = 0
    streams: dict[int, StreamModel] = field(default_factory=dict)
    control: list[tuple[int, int, bool]] = field(default_factory=list)  # (id, code, counted)
    grants: dict[int, None] = field(default_factory=dict)  # ordered: first decision first

    @property
    def queued_resets(self) -> int:
        return sum(counted for _, _, counted in self.control)

    def was_opened(self, stream_id: int) -> bool:
        # The device opens no stream here: an even id was never opened.
        return stream_id % 2 == 1 and stream_id <= self.last_open

    def receive(self, frame: Frame) -> list[EventKey]:
        """Apply one frame the client sent; return the events it must produce.
        Raises :class:`SessionError` where the spec says the session ends."""
        if self.queued_resets >= MAX_RESETS:
            raise SessionError("the peer does not read")
        stream_id = frame.stream_id
        if isinstance(frame, Open):
            if stream_id % 2 == 0 or stream_id <= self.last_open:
                raise SessionError("bad OPEN id")
            self.last_open = stream_id
            if len(self.streams) >= MAX_STREAMS:
                self.control.append((stream_id, ResetCode.REFUSED, True))
                return []
            self.streams[stream_id] = StreamModel()
            return [("opened", stream_id, None, None)]
        stream = self.streams.get(stream_id)
        if stream is None:
            if not self.was_opened(stream_id) and not isinstance(frame, Reset):
                self.control.append((stream_id, ResetCode.UNKNOWN_STREAM, True))
            return []
        if isinstance(frame, Reset):
            self.forget(stream_id)
            return [("reset", stream_id, frame.code, True)]
        if isinstance(frame, Data | Fin) and stream.fin_received:
            return self.abort(stream_id, ResetCode.PROTOCOL)
        if isinstance(frame, Data):
            if len(frame.data) > stream.recv_credit:
                return self.abort(stream_id, ResetCode.FLOW_CONTROL)
            stream.recv_credit -= len(frame.data)
            stream.unacked += len(frame.data)
            return [("data", stream_id, len(frame.data), None)]
        if isinstance(frame, Fin):
            stream.fin_received = True
            stream.window_due = 0
            self.grants.pop(stream_id, None)
            if stream.fin_sent:
                self.forget(stream_id)
            return [("ended", stream_id, None, None)]
        assert isinstance(frame, Window)
        if stream.fin_sent:
            return []  # we send no more DATA: ignored
        if stream.send_credit + frame.increment > MAX_WINDOW:
            return self.abort(stream_id, ResetCode.FLOW_CONTROL)
        stream.send_credit += frame.increment
        return []

    def abort(self, stream_id: int, code: ResetCode) -> list[EventKey]:
        self.control.append((stream_id, code, True))
        self.forget(stream_id)
        return [("reset", stream_id, code, False)]

    def forget(self, stream_id: int) -> None:
        del self.streams[stream_id]
        self.grants.pop(stream_id, None)

    # -- the device application --------------------------------------------------

    def acknowledge(self, stream_id: int, n: int) -> None:
        stream = self.streams[stream_id]
        stream.unacked -= n
        stream.consumed += n
        if not stream.fin_received and stream.consumed >= THRESHOLD:
            stream.window_due += stream.consumed
            stream.consumed = 0
            self.grants.setdefault(stream_id, None)

    def app_reset(self, stream_id: int) -> None:
        self.control.append((stream_id, ResetCode.CANCEL, True))  # the client opened it
        self.forget(stream_id)

    def flush(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]], set[int]]:
        """What ``data_to_send`` must return: RESETs (id, code) in order, WINDOWs
        (id, increment) in order, FINs (a set: round-robin order is the mux's)."""
        resets = [(stream_id, code) for stream_id, code, _ in self.control]
        self.control.clear()
        windows = []
        for stream_id in self.grants:
            stream = self.streams[stream_id]
            windows.append((stream_id, stream.window_due))
            stream.recv_credit += stream.window_due
            stream.window_due = 0
        self.grants.clear()
        fins = set()
        for stream_id, stream in list(self.streams.items()):
            if stream.fin_requested and not stream.fin_sent:
                fins.add(stream_id)
                stream.fin_sent = True
                if stream.fin_received:
                    self.forget(stream_id)
        return resets, windows, fins


def event_key(event: Event) -> EventKey:
    match event:
        case StreamOpened(stream_id, _):
            return ("opened", stream_id, None, None)
        case DataReceived(stream_id, data):
            return ("data", stream_id, len(data), None)
        case StreamEnded(stream_id):
            return ("ended", stream_id, None, None)
        case StreamReset(stream_id, code, _, remote):
            return ("reset", stream_id, code, remote)
    raise AssertionError(event)


#: One frame the client sends, chosen relative to the session's state: (kind,
#: which stream, a size/increment/code selector).
PeerOp = tuple[str, int, int]
PEER_OPS = st.tuples(
    st.sampled_from(["open", "open", "data", "data", "data", "fin", "window", "reset"]),
    st.integers(0, 99),
    st.integers(0, 99),
)


class MultiplexerAgainstModel(RuleBasedStateMachine):
    """The device's multiplexer and :class:`DeviceModel`, fed the same frames."""

    mux: Multiplexer
    model: DeviceModel
    dead: bool

    @initialize()
    def start(self) -> None:
        self.new_session()

    @precondition(lambda self: self.dead)
    @rule()
    def new_session(self) -> None:
        """After a session error the session is over: the next one starts afresh."""
        self.mux = Multiplexer(
            Role.DEVICE,
            initial_window=WINDOW,
            max_streams=MAX_STREAMS,
            max_queued_resets=MAX_RESETS,
        )
        self.model = DeviceModel()
        self.dead = False

    # -- choosing ids and sizes from the state -----------------------------------------

    def pick_id(self, selector: int) -> int:
        live = sorted(self.model.streams)
        last = self.model.last_open
        candidates = [*live, *live, last + 2, last + 4, 2, max(last, 1), max(last - 2, 1)]
        return candidates[selector % len(candidates)]

    def build(self, op: PeerOp) -> Frame:
        kind, which, amount = op
        model = self.model
        if kind == "open":
            last = model.last_open
            # Mostly the next valid id; sometimes a skipped one, a reused, lower or even one.
            choices = [last + 2, last + 2, last + 2, last + 6, max(last, 1), last + 1, 2]
            return Open(choices[which % len(choices)] or 1, "web")
        stream_id = self.pick_id(which)
        stream = model.streams.get(stream_id)
        if kind == "data":
            credit = stream.recv_credit if stream else WINDOW
            sizes = [credit, credit + 1, 1 + amount % (WINDOW + 8), 1 + amount % 8]
            return Data(stream_id, bytes(max(sizes[amount % len(sizes)], 1)))
        if kind == "fin":
            return Fin(stream_id)
        if kind == "window":
            credit = stream.send_credit if stream else WINDOW
            increments = [MAX_WINDOW - credit, MAX_WINDOW - credit + 1, 1 + amount, MAX_WINDOW]
            return Window(stream_id, min(max(increments[amount % 4], 1), MAX_WINDOW))
        return Reset(stream_id, [0, 3, 7, 999][amount % 4])

    # -- the peer ------------------------------------------------------------------------

    @precondition(lambda self: not self.dead)
    @rule(ops=st.lists(PEER_OPS, min_size=1, max_size=6))
    def peer_sends_a_message(self, ops: list[PeerOp]) -> None:
        """Several frames in one message; each is built from the state the frames
        before it leave, so some are valid and some break a rule on purpose."""
        frames: list[Frame] = []
        expected: list[EventKey] = []
        session_error = False
        for op in ops:
            frame = self.build(op)
            frames.append(frame)
            if session_error:
                continue  # never reached: the mux stops at the error
            try:
                expected += self.model.receive(frame)
            except SessionError:
                session_error = True
        message = encode_frames(frames)
        if session_error:
            with pytest.raises(RemoteProtocolError):
                self.mux.receive_message(message)
            self.dead = True  # the session is over
        else:
            self.mux.receive_message(message)
        assert [event_key(e) for e in self.mux.events()] == expected

    # -- the device application -------------------------------------------------------

    @precondition(lambda self: not self.dead and self.model.streams)
    @rule(which=st.integers(0, 99), fraction=st.sampled_from([1, 2, 4]))
    def app_acknowledges(self, which: int, fraction: int) -> None:
        live = sorted(self.model.streams)
        stream_id = live[which % len(live)]
        n = self.model.streams[stream_id].unacked // fraction
        self.mux.acknowledge(stream_id, n)
        self.model.acknowledge(stream_id, n)

    @precondition(lambda self: not self.dead and self.model.streams)
    @rule(which=st.integers(0, 99))
    def app_resets(self, which: int) -> None:
        live = sorted(self.model.streams)
        stream_id = live[which % len(live)]
        self.mux.reset_stream(stream_id, ResetCode.CANCEL, "app")
        self.model.app_reset(stream_id)

    @precondition(lambda self: not self.dead and self.model.streams)
    @rule(which=st.integers(0, 99))
    def app_sends_fin(self, which: int) -> None:
        live = sorted(self.model.streams)
        stream_id = live[which % len(live)]
        stream = self.model.streams[stream_id]
        if stream.fin_requested:
            with pytest.raises(LocalProtocolError):
                self.mux.send_fin(stream_id)
            return
        self.mux.send_fin(stream_id)
        stream.fin_requested = True

    @precondition(lambda self: not self.dead)
    @rule()
    def flush(self) -> None:
        frames = [f for m in self.mux.data_to_send() for f in decode_message(m)]
        resets, windows, fins = self.model.flush()
        assert [(f.stream_id, f.code) for f in frames if isinstance(f, Reset)] == resets
        assert [(f.stream_id, f.increment) for f in frames if isinstance(f, Window)] == windows
        assert {f.stream_id for f in frames if isinstance(f, Fin)} == fins
        assert not [f for f in frames if isinstance(f, Open | Data)]
        # Control frames first, then the FINs (which here follow no DATA).
        kinds = [type(f) for f in frames]
        assert kinds == sorted(kinds, key=[Reset, Window, Fin].index)

    # -- what must hold after every step -----------------------------------------------

    @invariant()
    def state_matches_the_model(self) -> None:
        if self.dead:
            return
        assert self.mux.stream_count == len(self.model.streams) <= MAX_STREAMS
        for stream_id, stream in self.model.streams.items():
            assert self.mux.stream_state(stream_id) is stream.state, stream_id
        assert self.mux.queued_resets == self.model.queued_resets
        # The peer provokes at most one RESET per frame, the app adds its own.
        assert self.mux.queued_resets <= MAX_RESETS + MAX_STREAMS


TestMultiplexerAgainstModel = MultiplexerAgainstModel.TestCase
TestMultiplexerAgainstModel.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# -- volume: bounded state whatever the peer sends --------------------------------------------

HOSTILE: st.SearchStrategy[Frame] = st.one_of(
    # Frames for never-opened streams: each asks for a RESET back.
    st.builds(Fin, st.integers(1, 2**16).map(lambda n: 2 * n)),
    st.builds(Window, st.integers(1, 2**16).map(lambda n: 2 * n), st.just(1)),
    st.builds(Data, st.integers(1, 2**16).map(lambda n: 2 * n), st.just(b"x")),
    # A RESET is never answered.
    st.builds(Reset, st.integers(1, 2**16), st.just(0)),
)
#: The most HOSTILE frames (12 bytes at most) that fit in one message.
HOSTILE_PER_MESSAGE = MAX_MESSAGE_SIZE // 12


def hostile_message(pattern: list[Frame], number: int, count: int) -> list[Frame]:
    """Message ``number`` of a peer repeating ``pattern``, ``count`` frames long."""
    return [pattern[(number + i) % len(pattern)] for i in range(count)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(HOSTILE, min_size=1, max_size=40),
    st.one_of(st.integers(1, 64), st.integers(1, HOSTILE_PER_MESSAGE)),
    st.integers(1, 64),
    st.booleans(),
)
def test_a_peer_that_does_not_read_is_cut_off_at_the_cap(
    pattern: list[Frame], frames_per_message: int, cap: int, open_streams: bool
) -> None:
    """The adapter hands nothing to the channel while the peer does not read
    (``data_to_send`` is never called): the RESETs the peer provokes stop at the
    cap with a session error, never later, whatever it sends; streams it opens
    (and the app refuses) count too."""
    device = Multiplexer(Role.DEVICE, max_queued_resets=cap, max_streams=4)
    provoked = 0  # RESETs the peer asked for
    next_open = 1
    # Every frame of the pattern but a RESET provokes one, and so does every OPEN:
    # the cap comes within this many messages unless nothing provokes.
    provoking = open_streams or not all(isinstance(f, Reset) for f in pattern)
    for message_number in range(1, (cap + 2) * (len(pattern) + 3) if provoking else 20):
        frames = hostile_message(pattern, message_number, frames_per_message)
        if open_streams and message_number % 3 == 0:
            frames[0] = Open(next_open, "web")
            next_open += 2
        try:
            device.receive_message(encode_frames(frames))
        except RemoteProtocolError as exc:
            assert "does not read" in str(exc)
            # The cap, or one over it: the app's reset of a stream the last message opened.
            assert cap <= device.queued_resets <= cap + 1
            break
        assert device.queued_resets <= cap  # checked before each frame: never past it
        for event in device.events():
            if isinstance(event, StreamOpened):  # the app refuses every stream
                device.reset_stream(event.stream_id, ResetCode.UNKNOWN_SERVICE, "no")
        provoked = device.queued_resets
        assert device.stream_count <= 4
    else:
        assert not provoking, "the peer provoked RESETs it never read and was not cut off"
        assert provoked == 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(HOSTILE, min_size=1, max_size=40),
    st.one_of(st.integers(1, 64), st.integers(1, HOSTILE_PER_MESSAGE)),
    st.integers(1, 30),
)
def test_a_peer_that_reads_never_meets_the_cap(
    pattern: list[Frame], frames_per_message: int, messages: int
) -> None:
    """With the adapter's loop — receive a message, then send what the mux wants
    to send — the RESETs queued never exceed one message's worth, so a peer that
    reads, however wrong its frames, is never cut off by the cap: the default cap
    is the most frames one message can hold."""
    device = Multiplexer(Role.DEVICE)
    assert MAX_QUEUED_RESETS == MAX_MESSAGE_SIZE // HEADER_SIZE
    for message_number in range(messages):
        device.receive_message(
            encode_frames(hostile_message(pattern, message_number, frames_per_message))
        )
        assert device.queued_resets <= frames_per_message
        for reply in device.data_to_send():
            assert len(reply) <= MAX_MESSAGE_SIZE
        assert device.queued_resets == 0


def test_a_full_message_of_unknown_stream_frames_is_answered_in_full() -> None:
    """The boundary: 8 192 FINs for never-opened streams, the most one message
    holds, reach the cap exactly; the next frame, while they are unsent, is a
    session error; once sent, the peer may go on."""
    frames_per_message = MAX_MESSAGE_SIZE // HEADER_SIZE
    message = encode_frames(Fin(2 * (i + 1)) for i in range(frames_per_message))
    assert len(message) == MAX_MESSAGE_SIZE
    device = Multiplexer(Role.DEVICE)
    device.receive_message(message)
    assert device.queued_resets == MAX_QUEUED_RESETS
    with pytest.raises(RemoteProtocolError, match=r"8192 RESET frames .* does not read"):
        device.receive_message(encode_frame(Fin(2)))
    device = Multiplexer(Role.DEVICE)
    device.receive_message(message)
    replies = [f for m in device.data_to_send() for f in decode_message(m)]
    assert len(replies) == frames_per_message
    assert {f.code for f in replies if isinstance(f, Reset)} == {ResetCode.UNKNOWN_STREAM}
    assert device.queued_resets == 0
    device.receive_message(message)  # read, so not cut off


def test_partly_sent_replies_still_count_until_they_leave() -> None:
    """``data_to_send(max_bytes)`` sends part of the queue; only what left is
    no longer counted."""
    device = Multiplexer(Role.DEVICE, max_queued_resets=10)
    device.receive_message(encode_frames(Fin(2 * (i + 1)) for i in range(10)))
    assert device.queued_resets == 10
    reset_size = len(encode_frame(Reset(2, ResetCode.UNKNOWN_STREAM, "stream was never opened")))
    device.data_to_send(max_bytes=3 * reset_size)
    assert device.queued_resets == 7
    device.receive_message(encode_frames(Fin(2) for _ in range(3)))
    assert device.queued_resets == 10
    with pytest.raises(RemoteProtocolError, match="does not read"):
        device.receive_message(encode_frame(Reset(5, 0)))  # even a harmless frame


def test_local_resets_of_our_own_streams_are_not_the_peers_doing() -> None:
    """Only RESETs that answer the peer count: a client app aborting the streams
    it opened, while the channel is blocked, is not the device misbehaving."""
    client = Multiplexer(Role.CLIENT, max_queued_resets=2)
    for _ in range(5):
        client.reset_stream(client.open_stream("web"), ResetCode.CANCEL)
    assert client.queued_resets == 0
    client.receive_message(encode_frame(Window(1, 1)))  # closed stream: ignored, no error
    device = Multiplexer(Role.DEVICE, max_queued_resets=2)
    device.receive_message(encode_frames([Open(1, "a"), Open(3, "b")]))
    device.reset_stream(1, ResetCode.UNKNOWN_SERVICE)
    device.reset_stream(3, ResetCode.CONNECT_FAILED)
    assert device.queued_resets == 2  # resetting the peer's streams answers the peer
    with pytest.raises(RemoteProtocolError, match="does not read"):
        device.receive_message(encode_frame(Open(5, "c")))


def test_max_queued_resets_must_be_positive() -> None:
    with pytest.raises(LocalProtocolError, match="max_queued_resets"):
        Multiplexer(Role.DEVICE, max_queued_resets=0)


# -- good streams among bad frames ------------------------------------------------------------

#: Frames a hostile client can slip between its good ones without ending the session.
STREAM_LEVEL_NOISE: st.SearchStrategy[Frame] = st.one_of(
    st.builds(Data, st.integers(1, 50).map(lambda n: 2 * n), st.binary(min_size=1, max_size=40)),
    st.builds(Fin, st.integers(1, 50).map(lambda n: 2 * n)),
    st.builds(Window, st.integers(1, 50).map(lambda n: 2 * n), st.integers(1, MAX_WINDOW)),
    st.builds(Reset, st.integers(1, 50).map(lambda n: 2 * n), st.integers(0, 9)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.integers(1, 3 * INITIAL_WINDOW), min_size=1, max_size=4),
    st.lists(STREAM_LEVEL_NOISE, min_size=1, max_size=30),
    st.integers(0, 2**32),
)
def test_good_streams_arrive_intact_among_bad_frames(
    sizes: list[int], noise: list[Frame], seed: int
) -> None:
    """A real client mux sends several streams; a hostile hand slips frames for
    streams the device never opened (even ids) into its messages. Every good
    byte arrives once and in order, every bad frame is answered (or ignored) as
    §2.3 says, and the device holds no state for any of them."""
    rng = random.Random(seed)
    client = Multiplexer(Role.CLIENT)
    device = Multiplexer(Role.DEVICE)
    payloads = {client.open_stream("web"): rng.randbytes(size) for size in sizes}
    for stream_id, payload in payloads.items():
        client.send_data(stream_id, payload)
        client.send_fin(stream_id)
    received = {stream_id: bytearray() for stream_id in payloads}
    ended: set[int] = set()
    answered = 0
    noise_left = list(noise)

    def deliver(message: bytes) -> None:
        nonlocal answered
        device.receive_message(message)
        for event in device.events():
            if isinstance(event, DataReceived):
                received[event.stream_id] += event.data
                device.acknowledge(event.stream_id, len(event.data))
            elif isinstance(event, StreamEnded):
                ended.add(event.stream_id)
                device.send_fin(event.stream_id)
            else:
                assert isinstance(event, StreamOpened), event
        for reply in device.data_to_send():
            for frame in decode_message(reply):
                if isinstance(frame, Reset):
                    assert frame.code is ResetCode.UNKNOWN_STREAM
                    assert frame.stream_id % 2 == 0  # only the never-opened even ids
                    answered += 1
            client.receive_message(reply)  # the client ignores RESETs for ids it never had
            client.events()

    for _ in range(10_000):
        messages = client.data_to_send()
        if not messages:
            break
        for message in messages:
            # Slip noise in front of the good frames while the message stays legal.
            while noise_left and len(message) + len(encode_frame(noise_left[0])) <= 65536:
                message = encode_frame(noise_left.pop(0)) + message
            deliver(message)
    while noise_left:
        deliver(encode_frame(noise_left.pop(0)))
    for stream_id, payload in payloads.items():
        assert bytes(received[stream_id]) == payload
    assert ended == set(payloads)
    assert answered == sum(1 for f in noise if not isinstance(f, Reset))
    assert device.stream_count == client.stream_count == 0
