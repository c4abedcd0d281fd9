"""The tunnel frame codec against PROTOCOL.md §2.2, §2.6 and the test vectors of §2.7."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.frames import (
    HEADER_SIZE,
    INITIAL_WINDOW,
    MAX_MESSAGE_SIZE,
    MAX_PAYLOAD,
    MAX_REASON_LEN,
    MAX_SERVICE_LEN,
    MAX_WINDOW,
    SERVICE_NAME_RE,
    Data,
    Fin,
    Frame,
    FrameType,
    Head,
    Open,
    OpenHttp,
    Reset,
    ResetCode,
    Window,
    decode_message,
    encode_frame,
    encode_frames,
    is_valid_service_name,
)


def unhex(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def test_constants() -> None:
    assert HEADER_SIZE == 8
    assert MAX_MESSAGE_SIZE == 65536
    assert MAX_PAYLOAD == 65528
    assert INITIAL_WINDOW == 262144
    assert MAX_WINDOW == 2**31 - 1
    assert MAX_SERVICE_LEN == 64
    assert MAX_REASON_LEN == 256
    assert [int(t) for t in FrameType] == [1, 2, 3, 4, 5, 6, 7]
    assert [(c.name, int(c)) for c in ResetCode] == [
        ("CANCEL", 0),
        ("UNKNOWN_SERVICE", 1),
        ("CONNECT_FAILED", 2),
        ("CONNECTION_RESET", 3),
        ("FLOW_CONTROL", 4),
        ("PROTOCOL", 5),
        ("REFUSED", 6),
        ("UNKNOWN_STREAM", 7),
        ("BAD_HEAD", 8),
        ("BAD_GATEWAY", 9),
    ]


# -- §2.7 test vectors ---------------------------------------------------------

VECTORS: list[tuple[str, list[Frame], str]] = [
    ("open", [Open(1, "web")], "01 00 0003 00000001 776562"),
    ("data", [Data(1, b"hi")], "02 00 0002 00000001 6869"),
    ("fin", [Fin(3)], "03 00 0000 00000003"),
    (
        "reset",
        [Reset(5, ResetCode.CONNECT_FAILED, "refused")],
        "04 00 0009 00000005 0002 72656675736564",
    ),
    ("window", [Window(1, 131072)], "05 00 0004 00000001 00020000"),
    ("two-frames", [Fin(1), Fin(3)], "03 00 0000 00000001 03 00 0000 00000003"),
]


@pytest.mark.parametrize(("frames", "wire"), [v[1:] for v in VECTORS], ids=[v[0] for v in VECTORS])
def test_vector_encodes_byte_for_byte(frames: list[Frame], wire: str) -> None:
    assert encode_frames(frames) == unhex(wire)
    if len(frames) == 1:
        assert encode_frame(frames[0]) == unhex(wire)


@pytest.mark.parametrize(("frames", "wire"), [v[1:] for v in VECTORS], ids=[v[0] for v in VECTORS])
def test_vector_decodes(frames: list[Frame], wire: str) -> None:
    assert decode_message(unhex(wire)) == frames


REJECTED_VECTORS = [
    ("length-past-end", "02 00 0005 00000001 6869", "past the end"),
    ("flags", "02 01 0002 00000001 6869", "flags"),
    ("unknown-type", "09 00 0000 00000001", "unknown frame type"),
    ("stream-0", "02 00 0002 00000000 6869", "stream id 0"),
    ("short-header", "0200", "short frame header"),
]


@pytest.mark.parametrize(
    ("wire", "match"), [v[1:] for v in REJECTED_VECTORS], ids=[v[0] for v in REJECTED_VECTORS]
)
def test_rejected_vector(wire: str, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode_message(unhex(wire))


# -- every other session error of §2.6 ----------------------------------------


def frame_bytes(frame_type: int, stream_id: int, payload: bytes, flags: int = 0) -> bytes:
    """A frame built by hand, so tests can put invalid values on the wire."""
    return (
        bytes([frame_type, flags])
        + len(payload).to_bytes(2, "big")
        + stream_id.to_bytes(4, "big")
        + payload
    )


MALFORMED = [
    ("empty-message", b"", "empty message"),
    ("oversized-message", bytes(MAX_MESSAGE_SIZE + 1), "exceeds 65536"),
    ("short-trailing-header", frame_bytes(3, 1, b"") + b"\x03\x00\x00", "short frame header"),
    (
        "second-frame-past-end",
        frame_bytes(3, 1, b"") + unhex("02 00 0005 00000001 68"),
        "past the end",
    ),
    ("type-0", frame_bytes(0, 1, b""), "unknown frame type 0x00"),
    ("type-8", frame_bytes(8, 1, b""), "unknown frame type 0x08"),
    ("open-empty", frame_bytes(1, 1, b""), "invalid service name"),
    ("open-too-long", frame_bytes(1, 1, b"a" * 65), "invalid service name"),
    ("open-bad-syntax", frame_bytes(1, 1, b"../x"), "invalid service name"),
    ("open-leading-dot", frame_bytes(1, 1, b".web"), "invalid service name"),
    ("open-newline", frame_bytes(1, 1, b"web\n"), "invalid service name"),
    ("open-non-ascii", frame_bytes(1, 1, "wéb".encode()), "invalid service name"),
    ("open-not-utf8", frame_bytes(1, 1, b"w\xffb"), "not valid UTF-8"),
    ("data-empty", frame_bytes(2, 1, b""), "empty payload"),
    ("fin-payload", frame_bytes(3, 1, b"x"), "FIN stream 1: 1-byte payload"),
    ("reset-empty", frame_bytes(4, 1, b""), "need >= 2"),
    ("reset-one-byte", frame_bytes(4, 1, b"\x00"), "need >= 2"),
    ("reset-reason-257", frame_bytes(4, 1, b"\x00\x00" + b"r" * 257), "at most 256"),
    ("reset-reason-not-utf8", frame_bytes(4, 1, b"\x00\x00\xc3\x28"), "not valid UTF-8"),
    ("window-3-bytes", frame_bytes(5, 1, b"\x00\x00\x01"), "must be 4"),
    ("window-5-bytes", frame_bytes(5, 1, b"\x00\x00\x00\x01\x00"), "must be 4"),
    ("window-zero", frame_bytes(5, 1, (0).to_bytes(4, "big")), "out of range"),
    ("window-2**31", frame_bytes(5, 1, (2**31).to_bytes(4, "big")), "out of range"),
    ("window-max-u32", frame_bytes(5, 1, b"\xff\xff\xff\xff"), "out of range"),
    ("flags-on-fin", frame_bytes(3, 1, b"", flags=0x80), "flags 0x80"),
    ("stream-0-open", frame_bytes(1, 0, b"web"), "stream id 0"),
    # A valid frame after an invalid one: the whole message is rejected.
    ("bad-then-good", frame_bytes(2, 1, b"") + frame_bytes(3, 1, b""), "empty payload"),
]


@pytest.mark.parametrize(
    ("wire", "match"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_message_is_a_session_error(wire: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode_message(wire)


def test_text_message_is_a_session_error() -> None:
    # aiortc delivers text DataChannel messages as str (§2.6: a session error).
    with pytest.raises(RemoteProtocolError, match="binary"):
        decode_message("03000000 00000001")  # type: ignore[arg-type]


def test_message_of_exactly_max_size_is_accepted() -> None:
    biggest = encode_frame(Data(7, bytes(MAX_PAYLOAD)))
    assert len(biggest) == MAX_MESSAGE_SIZE
    assert decode_message(biggest) == [Data(7, bytes(MAX_PAYLOAD))]
    # One frame more makes it one message too many, even though each frame is valid.
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        decode_message(biggest + encode_frame(Fin(7)))


def test_bytearray_and_memoryview_are_decoded() -> None:
    wire = unhex("03 00 0000 00000001 03 00 0000 00000003")
    assert decode_message(bytearray(wire)) == [Fin(1), Fin(3)]
    assert decode_message(memoryview(wire)) == [Fin(1), Fin(3)]


def test_payload_limits_are_accepted() -> None:
    frames: list[Frame] = [
        Open(2, "a"),
        Open(4, "A" + "b" * 63),
        Reset(6, 0),
        Reset(8, 65535, "é" * 128),  # 256 UTF-8 bytes
        Window(10, 1),
        Window(12, MAX_WINDOW),
        Data(2**32 - 1, b"x"),
    ]
    assert decode_message(encode_frames(frames)) == frames


def test_reset_codes() -> None:
    # Known codes become ResetCode members; unknown ones from a newer peer stay ints.
    assert Reset(1, 2).code is ResetCode.CONNECT_FAILED
    decoded = decode_message(frame_bytes(4, 1, (4242).to_bytes(2, "big") + b"why"))
    assert decoded == [Reset(1, 4242, "why")]
    assert type(decoded[0]).__name__ == "Reset"
    code = decoded[0].code  # type: ignore[union-attr]
    assert type(code) is int and code == 4242
    assert encode_frame(Reset(1, 4242, "why")) == frame_bytes(4, 1, b"\x10\x92why")


# -- local validation: our code cannot build a frame the wire cannot carry -----


@pytest.mark.parametrize(
    "build",
    [
        lambda: Fin(0),
        lambda: Fin(-1),
        lambda: Fin(2**32),
        lambda: Fin(True),
        lambda: Fin("1"),  # type: ignore[arg-type]
        lambda: Open(1, ""),
        lambda: Open(1, "a" * 65),
        lambda: Open(1, "-web"),
        lambda: Open(1, "web\n"),
        lambda: Open(1, "wéb"),
        lambda: Data(1, b""),
        lambda: Data(1, bytes(MAX_PAYLOAD + 1)),
        lambda: Data(1, "text"),  # type: ignore[arg-type]
        lambda: Reset(1, -1),
        lambda: Reset(1, 65536),
        lambda: Reset(1, 0, "r" * 257),
        lambda: Reset(1, 0, "é" * 129),
        lambda: Reset(1, 0, "\udc80"),
        lambda: Reset(1, 1.0),  # type: ignore[arg-type]
        lambda: Window(1, 0),
        lambda: Window(1, 2**31),
        lambda: Window(1, False),
    ],
)
def test_invalid_frame_cannot_be_built(build: object) -> None:
    assert callable(build)
    with pytest.raises(LocalProtocolError):
        build()


def test_frames_are_frozen_and_slotted() -> None:
    frame = Data(1, b"x")
    with pytest.raises(AttributeError):
        frame.data = b"y"  # type: ignore[misc]
    assert not hasattr(frame, "__dict__")


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("web", True),
        ("a", True),
        ("9", True),
        ("my-svc_1.v2", True),
        ("a" * 64, True),
        ("a" * 65, False),
        ("", False),
        ("-web", False),
        ("_web", False),
        (".web", False),
        ("web\n", False),
        ("we b", False),
        ("wéb", False),
        ("web/x", False),
    ],
)
def test_service_name_syntax(name: str, valid: bool) -> None:
    assert is_valid_service_name(name) is valid


# -- properties ----------------------------------------------------------------

stream_ids = st.integers(1, 2**32 - 1)
services = st.from_regex(SERVICE_NAME_RE, fullmatch=True)
reasons = st.text(max_size=MAX_REASON_LEN).filter(lambda s: len(s.encode()) <= MAX_REASON_LEN)
payloads = st.one_of(
    st.binary(min_size=1, max_size=64),
    st.binary(min_size=1, max_size=4096),
    st.builds(bytes, st.integers(MAX_PAYLOAD - 8, MAX_PAYLOAD)),
)

frames: st.SearchStrategy[Frame] = st.one_of(
    st.builds(Open, stream_ids, services),
    st.builds(Data, stream_ids, payloads),
    st.builds(Fin, stream_ids),
    st.builds(Reset, stream_ids, st.integers(0, 2**16 - 1), reasons),
    st.builds(Window, stream_ids, st.integers(1, MAX_WINDOW)),
    st.builds(OpenHttp, stream_ids, services, st.binary(min_size=1, max_size=64)),
    st.builds(Head, stream_ids, st.binary(min_size=1, max_size=64)),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(frames)
def test_single_frame_round_trips(frame: Frame) -> None:
    wire = encode_frame(frame)
    assert len(wire) <= MAX_MESSAGE_SIZE
    assert int.from_bytes(wire[2:4], "big") == len(wire) - HEADER_SIZE
    assert decode_message(wire) == [frame]


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(frames, min_size=1, max_size=30))
def test_batch_round_trips(batch: list[Frame]) -> None:
    wire = encode_frames(batch)
    if len(wire) <= MAX_MESSAGE_SIZE:
        assert decode_message(wire) == batch
    else:
        with pytest.raises(RemoteProtocolError, match="exceeds"):
            decode_message(wire)


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_remote_protocol_error(wire: bytes) -> None:
    try:
        decoded = decode_message(wire)
    except RemoteProtocolError:
        return
    # Whatever decodes must re-encode to the very same bytes: no lenient parsing.
    assert encode_frames(decoded) == wire


@settings(max_examples=300)
@given(
    st.lists(frames, min_size=1, max_size=4),
    st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_corrupted_messages_only_raise_remote_protocol_error(
    batch: list[Frame], corruptions: list[tuple[int, int]]
) -> None:
    # Random bytes rarely get past the header; corrupting valid messages reaches
    # every payload check.
    wire = bytearray(encode_frames(batch))
    for position, value in corruptions:
        wire[position % len(wire)] = value
    try:
        decoded = decode_message(bytes(wire))
    except RemoteProtocolError:
        return
    assert encode_frames(decoded) == bytes(wire)
