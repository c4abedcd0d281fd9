"""Signaling messages: JSON text frames over a WebSocket (PROTOCOL.md §1).

Every message of the §1.3 table is a frozen, slotted dataclass that validates
its fields when it is built, so an invalid value cannot exist: building one
with bad fields raises :class:`~protocol.errors.LocalProtocolError` (our code
broke the protocol). The wire format is handled by two functions:

``encode_signaling(msg) -> str``
    Compact JSON (``","`` / ``":"`` separators), keys in the spec's table order
    (``v``, ``type``, then the fields), non-ASCII kept as UTF-8. The §1.7 test
    vectors are byte-exact encodings.

``decode_signaling(data) -> SignalingMessage``
    For untrusted input. Returns a validated message or raises
    :class:`~protocol.errors.SignalingError` whose ``code`` is the §1.6 wire
    code to send back (``bad_message``, ``unsupported_version``,
    ``unknown_type``); it raises nothing else. Binary frames (``bytes``) are
    always ``bad_message``: signaling is text only (§1.1).

Decoding is deliberately strict: unknown keys, duplicate keys, missing keys,
``NaN``/``Infinity``, booleans where integers are expected, invalid ids, lone
surrogates (which could not be re-encoded as UTF-8) and over-long strings are
all rejected, because a message that passes here is forwarded to another peer.

Which role may send which message, and when, is not checked here: that is the
server's routing state machine (``signaling/router.py``, §1.4).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal, NoReturn, TypeAlias

from protocol.errors import LocalProtocolError, SignalingError
from protocol.fields import check_bool, check_id, check_session, check_str, invalid, shorten
from protocol.frames import is_valid_service_name
from protocol.ice import IceServer
from protocol.ids import (
    ID_PATTERN,
    SESSION_ID_PATTERN,
    is_valid_id,
    is_valid_session_id,
    new_session_id,
)

__all__ = [
    "ID_PATTERN",
    "MAX_FRAME_SIZE",
    "MAX_ICE_SERVERS",
    "MAX_MLINE_INDEX",
    "MAX_REASON_LEN",
    "MAX_SDP_LEN",
    "MESSAGE_TYPES",
    "PEER_ROLES",
    "PROTOCOL_VERSION",
    "SESSION_ID_PATTERN",
    "Answer",
    "Auth",
    "Candidate",
    "CloseCode",
    "DeviceInfo",
    "Devices",
    "Error",
    "ErrorCode",
    "IceCandidate",
    "IceServers",
    "ListDevices",
    "Moving",
    "Offer",
    "PeerLeft",
    "PeerRole",
    "Register",
    "Registered",
    "Revoke",
    "SessionEnd",
    "SessionRequest",
    "SignalingMessage",
    "Welcome",
    "decode_signaling",
    "encode_signaling",
    "is_valid_id",
    "is_valid_session_id",
    "new_session_id",
]

PROTOCOL_VERSION: Final = 1
#: Largest accepted WebSocket frame, in bytes of UTF-8 (§1.1, §1.5).
MAX_FRAME_SIZE: Final = 65536
#: Longest ``sdp`` of an ``offer``/``answer``, in characters (§1.3).
MAX_SDP_LEN: Final = 32768
#: Longest ``reason`` of a ``session_end``, in characters (§1.3).
MAX_REASON_LEN: Final = 200
#: Most servers in one ``ice_servers`` message (§1.3).
MAX_ICE_SERVERS: Final = 16
#: Longest ``ttl`` of an ``ice_servers`` message: a week, in seconds.
MAX_ICE_TTL: Final = 7 * 86400
#: Largest ``sdpMLineIndex``: it is an ``unsigned short`` in the WebRTC API.
MAX_MLINE_INDEX: Final = 65535
#: Most service names a device may announce in ``register`` (§1.3).
MAX_SERVICES: Final = 32
#: Most entries in one ``devices`` message; a longer answer takes several,
#: all but the last with ``more`` true. 16 entries of 32 services of 64
#: characters stay well under the frame limit.
MAX_LISTED_DEVICES: Final = 16

# Error codes are ours, but a client must still decode codes a newer server
# adds, so only their syntax is checked.
_ERROR_CODE_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")

PeerRole: TypeAlias = Literal["device", "client"]
PEER_ROLES: Final[tuple[PeerRole, ...]] = ("device", "client")


class ErrorCode(enum.StrEnum):
    """The ``code`` values of ``error`` messages (§1.6)."""

    BAD_MESSAGE = "bad_message"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_TYPE = "unknown_type"
    FORBIDDEN = "forbidden"
    DEVICE_OFFLINE = "device_offline"
    UNKNOWN_SESSION = "unknown_session"
    SESSION_EXISTS = "session_exists"
    BAD_STATE = "bad_state"
    TOO_MANY_SESSIONS = "too_many_sessions"
    RATE_LIMITED = "rate_limited"
    NOT_AUTHENTICATED = "not_authenticated"
    REPLACED = "replaced"


class CloseCode(enum.IntEnum):
    """WebSocket close codes of the signaling protocol (§1.6, RFC 6455 §7.4)."""

    GOING_AWAY = 1001
    MESSAGE_TOO_BIG = 1009
    AUTH_FAILED = 4401
    REPLACED = 4409
    RATE_LIMITED = 4429
    TOO_MANY_CONNECTIONS = 4503


# --- field validation (shared by construction and decoding) -------------------


def _check_optional_index(where: str, value: object) -> None:
    # bool is a subclass of int, and JSON true must not pass as 1.
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        invalid(where, "must be an integer or null")
    if not 0 <= value <= MAX_MLINE_INDEX:
        invalid(where, f"out of range 0..{MAX_MLINE_INDEX}")


# --- messages -----------------------------------------------------------------
#
# Field order is wire order: the encoder walks dataclasses.fields(), so the
# declaration order below must follow the §1.3 table.


@dataclass(frozen=True, slots=True)
class IceCandidate:
    """One trickled ICE candidate (RFC 8838), as ``RTCIceCandidateInit``.

    Wire keys are ``candidate``, ``sdpMid``, ``sdpMLineIndex``.
    """

    candidate: str
    sdp_mid: str | None
    sdp_mline_index: int | None

    WIRE_KEYS: ClassVar[tuple[str, str, str]] = ("candidate", "sdpMid", "sdpMLineIndex")

    def __post_init__(self) -> None:
        check_str("candidate.candidate", self.candidate)
        if self.sdp_mid is not None:
            check_str("candidate.sdpMid", self.sdp_mid)
        _check_optional_index("candidate.sdpMLineIndex", self.sdp_mline_index)

    def to_wire(self) -> dict[str, object]:
        return dict(
            zip(self.WIRE_KEYS, (self.candidate, self.sdp_mid, self.sdp_mline_index), strict=True)
        )


@dataclass(frozen=True, slots=True)
class Auth:
    """``auth`` (any →S): the JWT, when the URL carried none (§1.2)."""

    token: str

    TYPE: ClassVar[str] = "auth"

    def __post_init__(self) -> None:
        check_str("auth.token", self.token)
        if not self.token:
            invalid("auth.token", "must not be empty")


@dataclass(frozen=True, slots=True)
class Welcome:
    """``welcome`` (S→ any): authentication succeeded."""

    peer: str
    role: PeerRole

    TYPE: ClassVar[str] = "welcome"

    def __post_init__(self) -> None:
        check_id("welcome.peer", self.peer)
        if self.role not in PEER_ROLES:
            invalid("welcome.role", 'must be "device" or "client"')


@dataclass(frozen=True, slots=True)
class IceServers:
    """``ice_servers`` (S→ any): the STUN/TURN servers to gather candidates with.

    ``ttl`` is how many seconds the credentials hold from now (``None``: they
    do not expire). The server sends this before ``welcome`` and again before
    the credentials expire; the newest replaces the previous set.
    """

    ice_servers: tuple[IceServer, ...]
    ttl: int | None = None

    TYPE: ClassVar[str] = "ice_servers"
    #: Wire keys of one server, as the W3C ``RTCIceServer`` (``urls`` a string).
    SERVER_KEYS: ClassVar[tuple[str, str, str]] = ("urls", "username", "credential")

    def __post_init__(self) -> None:
        if not isinstance(self.ice_servers, tuple) or not all(
            isinstance(s, IceServer) for s in self.ice_servers
        ):
            invalid("ice_servers.ice_servers", "must be a tuple of IceServer")
        if len(self.ice_servers) > MAX_ICE_SERVERS:
            invalid("ice_servers.ice_servers", f"more than {MAX_ICE_SERVERS} servers")
        if self.ttl is not None:
            if isinstance(self.ttl, bool) or not isinstance(self.ttl, int):
                invalid("ice_servers.ttl", "must be an integer or null")
            if not 1 <= self.ttl <= MAX_ICE_TTL:
                invalid("ice_servers.ttl", f"out of range 1..{MAX_ICE_TTL}")

    def servers_to_wire(self) -> list[dict[str, object]]:
        wire: list[dict[str, object]] = []
        for server in self.ice_servers:
            entry: dict[str, object] = {"urls": server.url}
            if server.username is not None:
                entry["username"] = server.username
            if server.credential is not None:
                entry["credential"] = server.credential
            wire.append(entry)
        return wire


def _check_services(where: str, services: object) -> None:
    if not isinstance(services, tuple):
        invalid(where, "must be an array of service names")
    if len(services) > MAX_SERVICES:
        invalid(where, f"more than {MAX_SERVICES} services")
    for name in services:
        if not isinstance(name, str) or not is_valid_service_name(name):
            invalid(where, f"{shorten(name)} is not a valid service name")
    if len(set(services)) != len(services):
        invalid(where, "a service is named twice")


@dataclass(frozen=True, slots=True)
class Register:
    """``register`` (device →S): make this connection the device's link.

    ``services`` names what the device exposes, for discovery (``list_devices``);
    names only, never addresses. Left out on the wire when empty.
    """

    device: str
    services: tuple[str, ...] = ()

    TYPE: ClassVar[str] = "register"

    def __post_init__(self) -> None:
        check_id("register.device", self.device)
        _check_services("register.services", self.services)


@dataclass(frozen=True, slots=True)
class ListDevices:
    """``list_devices`` (client →S): which devices may I reach, and what do they expose?"""

    TYPE: ClassVar[str] = "list_devices"


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One entry of ``devices``: a device the token grants."""

    device: str
    online: bool
    services: tuple[str, ...] = ()

    WIRE_KEYS: ClassVar[tuple[str, ...]] = ("device", "online", "services")

    def __post_init__(self) -> None:
        check_id("devices.device", self.device)
        check_bool("devices.online", self.online)
        _check_services("devices.services", self.services)

    def to_wire(self) -> dict[str, object]:
        return {"device": self.device, "online": self.online, "services": list(self.services)}


@dataclass(frozen=True, slots=True)
class Devices:
    """``devices`` (S→ client): the answer to ``list_devices``, sorted by device id.

    An answer longer than :data:`MAX_LISTED_DEVICES` entries comes in several
    messages in a row; ``more`` is true on all but the last.
    """

    devices: tuple[DeviceInfo, ...]
    more: bool = False

    TYPE: ClassVar[str] = "devices"

    def __post_init__(self) -> None:
        check_bool("devices.more", self.more)
        if not isinstance(self.devices, tuple) or not all(
            isinstance(d, DeviceInfo) for d in self.devices
        ):
            invalid("devices.devices", "must be an array of device entries")
        if len(self.devices) > MAX_LISTED_DEVICES:
            invalid("devices.devices", f"more than {MAX_LISTED_DEVICES} devices")


@dataclass(frozen=True, slots=True)
class Registered:
    """``registered`` (S→ device): the device is online."""

    device: str

    TYPE: ClassVar[str] = "registered"

    def __post_init__(self) -> None:
        check_id("registered.device", self.device)


def _check_client(name: str, client: str | None) -> None:
    if client is not None:
        check_id(name, client)


@dataclass(frozen=True, slots=True)
class SessionRequest:
    """``session_request`` (client →S, S→ device).

    ``client`` is ``None`` (omitted on the wire) when a client sends it; the
    server sets it to the client's token ``sub`` when it forwards it.
    """

    session: str
    device: str
    client: str | None = None

    TYPE: ClassVar[str] = "session_request"

    def __post_init__(self) -> None:
        check_session("session_request.session", self.session)
        check_id("session_request.device", self.device)
        _check_client("session_request.client", self.client)


@dataclass(frozen=True, slots=True)
class Offer:
    """``offer`` (device →S, S→ client): the SDP offer."""

    session: str
    sdp: str

    TYPE: ClassVar[str] = "offer"

    def __post_init__(self) -> None:
        check_session("offer.session", self.session)
        check_str("offer.sdp", self.sdp, max_chars=MAX_SDP_LEN)


@dataclass(frozen=True, slots=True)
class Answer:
    """``answer`` (client →S, S→ device): the SDP answer.

    ``client``: set by the server on the way to the device (§1.3), as for
    :class:`SessionRequest`.
    """

    session: str
    sdp: str
    client: str | None = None

    TYPE: ClassVar[str] = "answer"

    def __post_init__(self) -> None:
        check_session("answer.session", self.session)
        check_str("answer.sdp", self.sdp, max_chars=MAX_SDP_LEN)
        _check_client("answer.client", self.client)


@dataclass(frozen=True, slots=True)
class Candidate:
    """``candidate`` (both ways): a trickled candidate, ``None`` = end-of-candidates.

    ``client``: set by the server on the way to the device only (§1.3).
    """

    session: str
    candidate: IceCandidate | None
    client: str | None = None

    TYPE: ClassVar[str] = "candidate"

    def __post_init__(self) -> None:
        check_session("candidate.session", self.session)
        if self.candidate is not None and not isinstance(self.candidate, IceCandidate):
            invalid("candidate.candidate", "must be an IceCandidate or None")
        _check_client("candidate.client", self.client)


@dataclass(frozen=True, slots=True)
class SessionEnd:
    """``session_end`` (both ways): either party ends the session.

    ``client``: set by the server on the way to the device only (§1.3).
    """

    session: str
    reason: str
    client: str | None = None

    TYPE: ClassVar[str] = "session_end"

    def __post_init__(self) -> None:
        check_session("session_end.session", self.session)
        check_str("session_end.reason", self.reason, max_chars=MAX_REASON_LEN)
        _check_client("session_end.client", self.client)


@dataclass(frozen=True, slots=True)
class PeerLeft:
    """``peer_left`` (S→ any): the other party's signaling link closed.

    ``client``: to a device, the client whose link closed (§1.3).
    """

    session: str
    client: str | None = None

    TYPE: ClassVar[str] = "peer_left"

    def __post_init__(self) -> None:
        check_session("peer_left.session", self.session)
        _check_client("peer_left.client", self.client)


@dataclass(frozen=True, slots=True)
class Revoke:
    """``revoke`` (S→ device): end every session of ``client`` now (§1.4, "Revocation")."""

    client: str
    reason: str

    TYPE: ClassVar[str] = "revoke"

    def __post_init__(self) -> None:
        check_id("revoke.client", self.client)
        check_str("revoke.reason", self.reason, max_chars=MAX_REASON_LEN)


@dataclass(frozen=True, slots=True)
class Moving:
    """``moving`` (S→ any): this signaling node is going away; connect to the
    next signaling URL now, without backoff (§1.8, "Drain")."""

    reason: str

    TYPE: ClassVar[str] = "moving"

    def __post_init__(self) -> None:
        check_str("moving.reason", self.reason, max_chars=MAX_REASON_LEN)


@dataclass(frozen=True, slots=True)
class Error:
    """``error`` (S→ any). ``session`` is always on the wire, ``null`` if unset."""

    code: str
    message: str
    session: str | None = None

    TYPE: ClassVar[str] = "error"

    def __post_init__(self) -> None:
        if not isinstance(self.code, str) or not _ERROR_CODE_RE.fullmatch(self.code):
            invalid("error.code", "not a valid error code")
        check_str("error.message", self.message)
        if self.session is not None:
            check_session("error.session", self.session)


SignalingMessage: TypeAlias = (
    Auth
    | Welcome
    | IceServers
    | Register
    | Registered
    | ListDevices
    | Devices
    | SessionRequest
    | Offer
    | Answer
    | Candidate
    | SessionEnd
    | PeerLeft
    | Revoke
    | Error
    | Moving
)

_MESSAGE_CLASSES: Final[tuple[type[SignalingMessage], ...]] = (
    Auth,
    Welcome,
    IceServers,
    Register,
    Registered,
    ListDevices,
    Devices,
    SessionRequest,
    Offer,
    Answer,
    Candidate,
    SessionEnd,
    PeerLeft,
    Revoke,
    Error,
    Moving,
)

#: Wire ``type`` → message class.
MESSAGE_TYPES: Final[Mapping[str, type[SignalingMessage]]] = {
    cls.TYPE: cls for cls in _MESSAGE_CLASSES
}

# Optional fields that are left out of the wire form when None (instead of
# being sent as null). Only the server sets ``client``, on what it sends a
# device (§1.3): the device checks every message against the session's owner.
_OMITTED_WHEN_NONE: Final[Mapping[type[SignalingMessage], frozenset[str]]] = {
    cls: frozenset({"client"}) for cls in (SessionRequest, Answer, Candidate, SessionEnd, PeerLeft)
}
# Optional fields left out of the wire form when empty (an empty array).
_OMITTED_WHEN_EMPTY: Final[Mapping[type[SignalingMessage], frozenset[str]]] = {
    Register: frozenset({"services"}),
}

_FIELD_NAMES: Final[Mapping[type[SignalingMessage], tuple[str, ...]]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in _MESSAGE_CLASSES
}


# --- encoding -----------------------------------------------------------------


def encode_signaling(msg: SignalingMessage) -> str:
    """Encode ``msg`` as one compact JSON text frame (§1.1, §1.7).

    Raises :class:`LocalProtocolError` if ``msg`` is not a signaling message.
    """
    cls = type(msg)
    names = _FIELD_NAMES.get(cls)
    if names is None:
        raise LocalProtocolError(f"not a signaling message: {cls.__name__}")
    omitted = _OMITTED_WHEN_NONE.get(cls, frozenset())
    omitted_empty = _OMITTED_WHEN_EMPTY.get(cls, frozenset())
    obj: dict[str, object] = {"v": PROTOCOL_VERSION, "type": cls.TYPE}
    for name in names:
        value = getattr(msg, name)
        if value is None and name in omitted:
            continue
        if value == () and name in omitted_empty:
            continue
        if isinstance(value, IceCandidate):
            value = value.to_wire()
        elif isinstance(msg, IceServers) and name == "ice_servers":
            value = msg.servers_to_wire()
        elif isinstance(msg, Devices) and name == "devices":
            value = [d.to_wire() for d in msg.devices]
        elif isinstance(value, tuple):
            value = list(value)
        obj[name] = value
    # ensure_ascii=False: "\uXXXX" escapes would make a forwarded message up
    # to 3x longer than the frame it came in, past the peer's frame limit.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


# --- decoding -----------------------------------------------------------------


def _bad(message: str) -> SignalingError:
    return SignalingError(ErrorCode.BAD_MESSAGE, message)


def _reject_constant(name: str) -> NoReturn:
    raise _bad(f"{name} is not valid JSON")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # The json module keeps the last duplicate; a peer could then show one
    # value to a lenient reader and another to us.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _bad("duplicate key in JSON object")
    return obj


def _parse_json(data: str | bytes) -> object:
    if not isinstance(data, str):
        raise _bad("binary frames are not accepted: send JSON in a text frame")
    # len(str) <= its UTF-8 length, so the cheap test first.
    if len(data) > MAX_FRAME_SIZE or len(data.encode("utf-8", "surrogatepass")) > MAX_FRAME_SIZE:
        raise _bad(f"message larger than {MAX_FRAME_SIZE} bytes")
    try:
        return json.loads(
            data, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
        )
    except SignalingError:
        raise
    except RecursionError:
        raise _bad("JSON nested too deeply") from None
    except ValueError:
        # JSONDecodeError, and int() refusing a number with too many digits.
        raise _bad("not valid JSON") from None


def _decode_ice_candidate(value: object) -> IceCandidate | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad("candidate.candidate: must be an object or null")
    keys = set(value)
    expected = set(IceCandidate.WIRE_KEYS)
    # Browsers' RTCIceCandidate.toJSON() adds usernameFragment; accept and drop it
    # (the ufrag is in the SDP already) so a page can forward candidates as they come.
    allowed = expected | {"usernameFragment"}
    if not expected <= keys <= allowed:
        raise _bad(_key_problem("candidate.candidate", keys, allowed, expected))
    ufrag = value.get("usernameFragment")
    if ufrag is not None and (not isinstance(ufrag, str) or len(ufrag) > 256):
        raise _bad("candidate.usernameFragment: must be a string of at most 256 chars or null")
    candidate, sdp_mid, index = (value[k] for k in IceCandidate.WIRE_KEYS)
    try:
        return IceCandidate(candidate, sdp_mid, index)
    except LocalProtocolError as exc:
        raise _bad(str(exc)) from None


def _decode_ice_servers(value: object) -> tuple[IceServer, ...]:
    if not isinstance(value, list):
        raise _bad("ice_servers.ice_servers: must be an array")
    if len(value) > MAX_ICE_SERVERS:
        raise _bad(f"ice_servers.ice_servers: more than {MAX_ICE_SERVERS} servers")
    servers = []
    allowed = set(IceServers.SERVER_KEYS)
    for entry in value:
        if not isinstance(entry, dict):
            raise _bad("ice_servers.ice_servers: each server must be an object")
        keys = set(entry)
        if not {"urls"} <= keys <= allowed:
            raise _bad(_key_problem("ice_servers.ice_servers", keys, allowed, {"urls"}))
        try:
            servers.append(IceServer(entry["urls"], entry.get("username"), entry.get("credential")))
        except ValueError as exc:
            raise _bad(f"ice_servers.ice_servers: {exc}") from None
    return tuple(servers)


def _decode_names(where: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _bad(f"{where}: must be an array of service names")
    return tuple(value)


def _decode_devices(value: object) -> tuple[DeviceInfo, ...]:
    if not isinstance(value, list):
        raise _bad("devices.devices: must be an array")
    if len(value) > MAX_LISTED_DEVICES:
        raise _bad(f"devices.devices: more than {MAX_LISTED_DEVICES} devices")
    entries = []
    allowed = set(DeviceInfo.WIRE_KEYS)
    for entry in value:
        if not isinstance(entry, dict):
            raise _bad("devices.devices: each device must be an object")
        keys = set(entry)
        if keys != allowed:
            raise _bad(_key_problem("devices.devices", keys, allowed, allowed))
        services = _decode_names("devices.services", entry["services"])
        try:
            entries.append(DeviceInfo(entry["device"], entry["online"], services))
        except LocalProtocolError as exc:
            raise _bad(str(exc)) from None
    return tuple(entries)


def _key_problem(where: str, keys: set[str], allowed: set[str], required: set[str]) -> str:
    unknown = sorted(keys - allowed)
    if unknown:
        return f"{where}: unknown key {shorten(unknown[0])}"
    missing = sorted(required - keys)
    return f"{where}: missing key {missing[0]!r}"


def decode_signaling(data: str | bytes) -> SignalingMessage:
    """Decode one WebSocket frame into a validated signaling message.

    ``data`` is what the WebSocket library delivered: ``str`` for a text frame,
    ``bytes`` for a binary one (always rejected). Raises only
    :class:`SignalingError`, with ``code`` ``unsupported_version`` (``v`` is an
    integer other than 1), ``unknown_type`` (``type`` is a string naming no
    message) or ``bad_message`` (anything else).
    """
    obj = _parse_json(data)
    if not isinstance(obj, dict):
        raise _bad("a message must be a JSON object")
    # Version first: a newer version may have types and fields we don't know.
    if "v" not in obj:
        raise _bad("missing key 'v'")
    version = obj["v"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise _bad("'v' must be an integer")
    if version != PROTOCOL_VERSION:
        raise SignalingError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {shorten(version)} is not supported (this server speaks 1)",
        )
    type_ = obj.get("type")
    if not isinstance(type_, str):
        raise _bad("'type' must be a string")
    cls = MESSAGE_TYPES.get(type_)
    if cls is None:
        raise SignalingError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {shorten(type_)}")

    names = _FIELD_NAMES[cls]
    keys = set(obj) - {"v", "type"}
    allowed = set(names)
    required = (
        allowed
        - _OMITTED_WHEN_NONE.get(cls, frozenset())
        - _OMITTED_WHEN_EMPTY.get(cls, frozenset())
    )
    if not (required <= keys <= allowed):
        raise _bad(_key_problem(type_, keys, allowed, required))
    fields: dict[str, Any] = {name: obj[name] for name in names if name in keys}
    if cls is Candidate:
        fields["candidate"] = _decode_ice_candidate(fields["candidate"])
    elif cls is IceServers:
        fields["ice_servers"] = _decode_ice_servers(fields["ice_servers"])
    elif cls is Devices:
        fields["devices"] = _decode_devices(fields["devices"])
    elif cls is Register and "services" in fields:
        fields["services"] = _decode_names("register.services", fields["services"])
    if "client" in fields and fields["client"] is None:
        # Omitted, not null, is how "no client" is written (one way to say it).
        raise _bad(f"{type_}.client: must be an id when present")
    try:
        return cls(**fields)
    except LocalProtocolError as exc:
        raise _bad(str(exc)) from None
