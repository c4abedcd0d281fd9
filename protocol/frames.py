"""Tunnel frame codec: PROTOCOL.md §2.2 ("Tunnel frames"), carried on an RFC 8831 DataChannel.

Every DataChannel message is binary and holds one or more whole frames; a message
is never larger than :data:`MAX_MESSAGE_SIZE`. A frame is an 8-byte header
(``type: u8, flags: u8, length: u16, stream id: u32``, big-endian) followed by
``length`` bytes of payload.

Public API:

* the frame values :class:`Open`, :class:`Data`, :class:`Fin`, :class:`Reset`,
  :class:`Window`, and for HTTP streams (§2.8) :class:`OpenHttp` and
  :class:`Head` (union :data:`Frame`): frozen, slotted dataclasses that
  validate when built and raise :class:`~protocol.errors.LocalProtocolError` if
  our own code builds one the wire cannot carry;
* :func:`encode_frame` / :func:`encode_frames`: values to bytes;
* :func:`decode_message`: one received message to a list of frames. On untrusted
  input it returns typed values or raises
  :class:`~protocol.errors.RemoteProtocolError` (a session error, §2.6) and never
  anything else.

This module only knows the shape of frames; which frame is legal on which stream
and in which state is the multiplexer's business (:mod:`protocol.mux`).
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, TypeAlias

from protocol.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "HEADER_SIZE",
    "INITIAL_WINDOW",
    "MAX_MESSAGE_SIZE",
    "MAX_PAYLOAD",
    "MAX_REASON_LEN",
    "MAX_SERVICE_LEN",
    "MAX_STREAM_ID",
    "MAX_WINDOW",
    "SERVICE_NAME_RE",
    "Data",
    "Fin",
    "Frame",
    "FrameType",
    "Head",
    "Open",
    "OpenHttp",
    "Reset",
    "ResetCode",
    "Window",
    "decode_message",
    "encode_frame",
    "encode_frames",
    "is_valid_service_name",
]

HEADER_SIZE: Final = 8
#: The smallest ``max-message-size`` browsers advertise (§2.1); we never send more
#: and reject more.
MAX_MESSAGE_SIZE: Final = 65536
#: A frame never spans two messages, so one DATA frame carries at most this much.
MAX_PAYLOAD: Final = MAX_MESSAGE_SIZE - HEADER_SIZE
INITIAL_WINDOW: Final = 262144
MAX_WINDOW: Final = 2**31 - 1
MAX_SERVICE_LEN: Final = 64
MAX_REASON_LEN: Final = 256
MAX_STREAM_ID: Final = 2**32 - 1

_RESET_CODE_MAX: Final = 2**16 - 1
_HEADER: Final = struct.Struct(">BBHI")
_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")

#: Service name syntax of PROTOCOL.md (identifier table). ASCII only, so a valid
#: name's UTF-8 encoding has as many bytes as characters.
SERVICE_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def is_valid_service_name(name: str) -> bool:
    """Whether ``name`` is a valid service name (``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``)."""
    # fullmatch, not match + "$": "$" would also accept a trailing newline.
    return isinstance(name, str) and SERVICE_NAME_RE.fullmatch(name) is not None


class FrameType(enum.IntEnum):
    """The ``type`` byte of the frame header."""

    OPEN = 1
    DATA = 2
    FIN = 3
    RESET = 4
    WINDOW = 5
    OPEN_HTTP = 6
    HEAD = 7


class ResetCode(enum.IntEnum):
    """RESET codes of §2.2.

    A received code outside this enum is kept as a plain ``int``: a newer peer may
    define more codes, and the stream is dead either way.
    """

    CANCEL = 0
    UNKNOWN_SERVICE = 1
    CONNECT_FAILED = 2
    CONNECTION_RESET = 3
    FLOW_CONTROL = 4
    PROTOCOL = 5
    REFUSED = 6
    UNKNOWN_STREAM = 7
    BAD_HEAD = 8
    BAD_GATEWAY = 9


def _is_int(value: object) -> bool:
    # bool is an int subclass; True as a stream id is a bug, not stream 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_stream_id(stream_id: int) -> None:
    if not _is_int(stream_id):
        raise LocalProtocolError(f"stream id must be an int, not {type(stream_id).__name__}")
    if not 1 <= stream_id <= MAX_STREAM_ID:
        raise LocalProtocolError(f"stream id {stream_id} out of range 1..{MAX_STREAM_ID}")


@dataclass(frozen=True, slots=True)
class Open:
    """OPEN: the sender opens stream ``stream_id`` to the device's ``service``."""

    stream_id: int
    service: str

    def __post_init__(self) -> None:
        _check_stream_id(self.stream_id)
        if not is_valid_service_name(self.service):
            raise LocalProtocolError(f"invalid service name {self.service!r}")


@dataclass(frozen=True, slots=True)
class Data:
    """DATA: 1 to :data:`MAX_PAYLOAD` bytes of stream data (flow-controlled)."""

    stream_id: int
    data: bytes

    def __post_init__(self) -> None:
        _check_stream_id(self.stream_id)
        if not isinstance(self.data, bytes):
            raise LocalProtocolError(f"DATA payload must be bytes, not {type(self.data).__name__}")
        if not 1 <= len(self.data) <= MAX_PAYLOAD:
            raise LocalProtocolError(
                f"DATA payload of {len(self.data)} bytes, must be 1..{MAX_PAYLOAD}"
            )


@dataclass(frozen=True, slots=True)
class Fin:
    """FIN: the sender will send no more DATA on this stream."""

    stream_id: int

    def __post_init__(self) -> None:
        _check_stream_id(self.stream_id)


@dataclass(frozen=True, slots=True)
class Reset:
    """RESET: both halves of the stream are closed abruptly.

    ``code`` is normalised to a :class:`ResetCode` member when it is a known code,
    so ``Reset(1, 2).code is ResetCode.CONNECT_FAILED``; unknown codes stay ints.
    """

    stream_id: int
    code: int
    reason: str = ""

    def __post_init__(self) -> None:
        _check_stream_id(self.stream_id)
        if not _is_int(self.code):
            raise LocalProtocolError(f"RESET code must be an int, not {type(self.code).__name__}")
        if not 0 <= self.code <= _RESET_CODE_MAX:
            raise LocalProtocolError(f"RESET code {self.code} out of range 0..{_RESET_CODE_MAX}")
        if not isinstance(self.reason, str):
            raise LocalProtocolError("RESET reason must be a str")
        try:
            encoded = self.reason.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates
            raise LocalProtocolError(f"RESET reason is not encodable as UTF-8: {exc}") from None
        if len(encoded) > MAX_REASON_LEN:
            raise LocalProtocolError(
                f"RESET reason of {len(encoded)} UTF-8 bytes, at most {MAX_REASON_LEN}"
            )
        # Frozen dataclass: normalising a field in __post_init__ needs object.__setattr__.
        object.__setattr__(self, "code", _as_reset_code(self.code))


@dataclass(frozen=True, slots=True)
class Window:
    """WINDOW: the receiver lets the sender send ``increment`` more DATA bytes."""

    stream_id: int
    increment: int

    def __post_init__(self) -> None:
        _check_stream_id(self.stream_id)
        if not _is_int(self.increment):
            raise LocalProtocolError(
                f"WINDOW increment must be an int, not {type(self.increment).__name__}"
            )
        if not 1 <= self.increment <= MAX_WINDOW:
            raise LocalProtocolError(
                f"WINDOW increment {self.increment} out of range 1..{MAX_WINDOW}"
            )


@dataclass(frozen=True, slots=True)
class OpenHttp:
    """OPEN_HTTP (§2.8): the client opens an HTTP stream to ``service``.

    ``head`` is the encoded request head (:mod:`protocol.http_heads`); its JSON
    is judged by the multiplexer, which resets a stream with a bad one instead
    of ending the session.
    """

    stream_id: int
    service: str
    head: bytes

    def __post_init__(self) -> None:
        _check_stream_id(self.stream_id)
        if not is_valid_service_name(self.service):
            raise LocalProtocolError(f"invalid service name {self.service!r}")
        _check_head(self.head, 1 + len(self.service))


@dataclass(frozen=True, slots=True)
class Head:
    """HEAD (§2.8): the device's encoded response head on an HTTP stream."""

    stream_id: int
    head: bytes

    def __post_init__(self) -> None:
        _check_stream_id(self.stream_id)
        _check_head(self.head, 0)


def _check_head(head: bytes, before: int) -> None:
    if not isinstance(head, bytes):
        raise LocalProtocolError(f"a head must be bytes, not {type(head).__name__}")
    if not 1 <= len(head) <= MAX_PAYLOAD - before:
        raise LocalProtocolError(f"a head of {len(head)} bytes does not fit in a frame")


Frame: TypeAlias = Open | Data | Fin | Reset | Window | OpenHttp | Head


def _as_reset_code(code: int) -> int:
    try:
        return ResetCode(code)
    except ValueError:
        return int(code)


def _payload(frame: Frame) -> tuple[FrameType, bytes]:
    match frame:
        case Open(service=service):
            return FrameType.OPEN, service.encode("ascii")
        case Data(data=data):
            return FrameType.DATA, data
        case Fin():
            return FrameType.FIN, b""
        case Reset(code=code, reason=reason):
            return FrameType.RESET, _U16.pack(code) + reason.encode("utf-8")
        case Window(increment=increment):
            return FrameType.WINDOW, _U32.pack(increment)
        case OpenHttp(service=service, head=head):
            return FrameType.OPEN_HTTP, bytes((len(service),)) + service.encode("ascii") + head
        case Head(head=head):
            return FrameType.HEAD, head
    raise LocalProtocolError(f"not a frame: {frame!r}")


def encode_frame(frame: Frame) -> bytes:
    """The wire bytes of one frame (header and payload)."""
    frame_type, payload = _payload(frame)
    return _HEADER.pack(frame_type, 0, len(payload), frame.stream_id) + payload


def encode_frames(frames: Iterable[Frame]) -> bytes:
    """The concatenated wire bytes of ``frames``: one message if it fits in
    :data:`MAX_MESSAGE_SIZE` (the caller packs; this function does not split)."""
    return b"".join(encode_frame(frame) for frame in frames)


def decode_message(message: bytes | bytearray | memoryview) -> list[Frame]:
    """Decode one DataChannel message into its frames, in order.

    Raises :class:`~protocol.errors.RemoteProtocolError` for every session error of
    §2.6: the whole message is then untrustworthy and the session must end. A
    message is decoded entirely before anything is returned, so a caller never
    acts on the first half of a corrupt message.
    """
    if isinstance(message, bytearray | memoryview):
        message = bytes(message)  # a copy of at most 64 KiB; keeps the indexing below simple
    if not isinstance(message, bytes):
        # §2.6: a text message (aiortc hands us a str) is a session error.
        raise RemoteProtocolError(f"tunnel message must be binary, not {type(message).__name__}")
    size = len(message)
    if size > MAX_MESSAGE_SIZE:
        raise RemoteProtocolError(f"message of {size} bytes exceeds {MAX_MESSAGE_SIZE}")
    if size == 0:
        raise RemoteProtocolError("empty message: a message holds at least one frame")
    frames: list[Frame] = []
    offset = 0
    while offset < size:
        if size - offset < HEADER_SIZE:
            raise RemoteProtocolError(
                f"short frame header at offset {offset}: {size - offset} bytes, need {HEADER_SIZE}"
            )
        raw_type, flags, length, stream_id = _HEADER.unpack_from(message, offset)
        start = offset + HEADER_SIZE
        end = start + length
        if end > size:
            raise RemoteProtocolError(
                f"frame at offset {offset} has length {length}, "
                f"running {end - size} bytes past the end of the message"
            )
        if flags != 0:
            raise RemoteProtocolError(f"frame at offset {offset} has non-zero flags 0x{flags:02x}")
        try:
            frame_type = FrameType(raw_type)
        except ValueError:
            raise RemoteProtocolError(f"unknown frame type 0x{raw_type:02x}") from None
        if stream_id == 0:
            raise RemoteProtocolError(f"{frame_type.name} frame on reserved stream id 0")
        frames.append(_decode_frame(frame_type, stream_id, message[start:end]))
        offset = end
    return frames


def _decode_frame(frame_type: FrameType, stream_id: int, payload: bytes) -> Frame:
    # Payload checks mirror the dataclass validation, but raise RemoteProtocolError:
    # here the peer, not our code, produced the invalid value.
    if frame_type is FrameType.OPEN:
        service = _decode_utf8(payload, "OPEN service name")
        if not is_valid_service_name(service):
            raise RemoteProtocolError(f"OPEN stream {stream_id}: invalid service name {service!r}")
        return Open(stream_id, service)
    if frame_type is FrameType.DATA:
        if not payload:
            raise RemoteProtocolError(f"DATA stream {stream_id}: empty payload")
        return Data(stream_id, payload)
    if frame_type is FrameType.FIN:
        if payload:
            raise RemoteProtocolError(f"FIN stream {stream_id}: {len(payload)}-byte payload")
        return Fin(stream_id)
    if frame_type is FrameType.RESET:
        if len(payload) < _U16.size:
            raise RemoteProtocolError(
                f"RESET stream {stream_id}: payload of {len(payload)} bytes, need >= 2"
            )
        (code,) = _U16.unpack_from(payload)
        raw_reason = payload[_U16.size :]
        if len(raw_reason) > MAX_REASON_LEN:
            raise RemoteProtocolError(
                f"RESET stream {stream_id}: reason of {len(raw_reason)} bytes, "
                f"at most {MAX_REASON_LEN}"
            )
        return Reset(stream_id, code, _decode_utf8(raw_reason, "RESET reason"))
    if frame_type is FrameType.OPEN_HTTP:
        return _decode_open_http(stream_id, payload)
    if frame_type is FrameType.HEAD:
        if not payload:
            raise RemoteProtocolError(f"HEAD stream {stream_id}: empty payload")
        return Head(stream_id, payload)
    # FrameType is exhaustive, so this is WINDOW.
    if len(payload) != _U32.size:
        raise RemoteProtocolError(
            f"WINDOW stream {stream_id}: payload of {len(payload)} bytes, must be 4"
        )
    (increment,) = _U32.unpack(payload)
    if not 1 <= increment <= MAX_WINDOW:
        raise RemoteProtocolError(
            f"WINDOW stream {stream_id}: increment {increment} out of range 1..{MAX_WINDOW}"
        )
    return Window(stream_id, increment)


def _decode_open_http(stream_id: int, payload: bytes) -> OpenHttp:
    # Only the framing (name length, name) is a session error; the head's JSON is
    # the multiplexer's to judge, per stream (§2.8).
    size = payload[0] if payload else 0
    if size == 0 or 1 + size >= len(payload):
        raise RemoteProtocolError(
            f"OPEN_HTTP stream {stream_id}: service name length {size} "
            f"does not fit a payload of {len(payload)} bytes with a head"
        )
    service = _decode_utf8(payload[1 : 1 + size], "OPEN_HTTP service name")
    if not is_valid_service_name(service):
        raise RemoteProtocolError(f"OPEN_HTTP stream {stream_id}: invalid service name {service!r}")
    return OpenHttp(stream_id, service, payload[1 + size :])


def _decode_utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError(f"{what} is not valid UTF-8: {exc.reason}") from None
