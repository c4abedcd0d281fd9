"""Supervisor ↔ worker messages and the control endpoint: msgpack (PROTOCOL.md §3, §4).

Pure codec: no sockets, no ZeroMQ. The adapters put these bytes in ZeroMQ frames.

Worker messages (§3)
    :class:`Hello`, :class:`Assign`, :class:`Relay`, :class:`StateReport`,
    :class:`Heartbeat`, :class:`Ended`, :class:`Drain`, :class:`Stop`,
    :class:`Release`, :class:`Released` (union
    :data:`IpcMessage`) are frozen, slotted dataclasses that validate when they
    are built: building one the wire cannot carry raises
    :class:`~protocol.errors.LocalProtocolError`.

    ``encode_ipc(message) -> bytes``
        The envelope ``{"v": 1, "t": type, "b": body}`` as one msgpack map, keys
        in the spec's order, strings as msgpack str, floats as float 64. Raises
        :class:`LocalProtocolError` if the result would exceed
        :data:`MAX_IPC_MESSAGE` (an ``assign`` with thousands of services).

    ``decode_ipc(data) -> IpcMessage``
        For untrusted input. Returns a validated message or raises
        :class:`IpcError`, and nothing else.

Control endpoint (§4)
    :class:`ControlRequest` and :class:`ControlReply`, with
    ``encode_control_request`` / ``decode_control_request`` and
    ``encode_control_reply`` / ``decode_control_reply``, the same contract,
    bounded by :data:`MAX_CONTROL_MESSAGE`.

Decoding is strict for the same reason as signaling's: the supervisor acts on
these messages (spawns, kills, relays to the signaling server), so a value that
passes here is fully valid. msgpack is decoded with ``raw=False`` (strings must
be UTF-8), ``strict_map_key=True``, bounded lengths, no bin and no ext types
(including the timestamp type, which msgpack decodes without asking the
``ext_hook``), no duplicate map keys, no trailing bytes; booleans are never
integers.
"""

from __future__ import annotations

import ipaddress
import math
import re
import secrets
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Final, NoReturn, TypeAlias

import msgpack  # type: ignore[import-untyped, unused-ignore]

from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.fields import (
    check_bool,
    check_choice,
    check_id,
    check_int,
    check_session,
    check_str,
    invalid,
    shorten,
)
from protocol.frames import is_valid_service_name
from protocol.ice import ICE_POLICIES, IceConfig, IcePolicy, IceServer
from protocol.signaling import MAX_FRAME_SIZE, MAX_REASON_LEN

__all__ = [
    "CONTROL_COMMANDS",
    "IPC_VERSION",
    "MAX_CONTROL_MESSAGE",
    "MAX_IPC_MESSAGE",
    "MAX_REASON_LEN",
    "WORKER_ID_RE",
    "ZMQ_CONTROL_CLIENT_MAX_MSG_SIZE",
    "ZMQ_HWM",
    "ZMQ_MAX_MSG_SIZE",
    "Assign",
    "ControlReply",
    "ControlRequest",
    "Drain",
    "Ended",
    "Heartbeat",
    "Hello",
    "IceUpdate",
    "IpcError",
    "IpcMessage",
    "Relay",
    "Release",
    "Released",
    "StateReport",
    "Stop",
    "decode_control_reply",
    "decode_control_request",
    "decode_ipc",
    "encode_control_reply",
    "encode_control_request",
    "encode_ipc",
    "new_worker_id",
]

IPC_VERSION: Final = 1
#: Largest supervisor ↔ worker message, in bytes (§3).
MAX_IPC_MESSAGE: Final = 262144
#: Largest control request or reply, in bytes (§4): a ``sessions`` reply lists up
#: to 1024 sessions (§1.5), which does not fit in :data:`MAX_IPC_MESSAGE`.
MAX_CONTROL_MESSAGE: Final = 1048576

#: ZeroMQ high-water mark (``SNDHWM``, ``RCVHWM``) of the worker and control
#: sockets, at both ends: messages queued per peer each way before sends fail
#: (ROUTER_MANDATORY) or wait; finite, so a wedged peer cannot eat memory.
#: Also how many queued messages the supervisor reads when a worker exits.
ZMQ_HWM: Final = 1000
#: ZeroMQ ``MAXMSGSIZE`` of the worker and control sockets: one message of
#: :data:`MAX_IPC_MESSAGE` with room for framing; a larger one drops the peer.
ZMQ_MAX_MSG_SIZE: Final = MAX_IPC_MESSAGE + 64
#: ``MAXMSGSIZE`` of the CLI's control socket: far above :data:`MAX_CONTROL_MESSAGE`,
#: so an oversized reply is reported as a bad reply, not as a silent supervisor.
ZMQ_CONTROL_CLIENT_MAX_MSG_SIZE: Final = 16 * 1024 * 1024

#: Worker ids, also the worker's ZeroMQ routing identity. Use ``fullmatch``.
WORKER_ID_RE: Final = re.compile(r"w-[0-9a-f]{16}")

CONTROL_COMMANDS: Final = ("status", "sessions", "kill", "stop")

# Longest string and longest array/map msgpack will build for us. A relay
# message is the longest string (one signaling frame, §1.1); a control reply
# holds the longest lists (one entry per session).
_MAX_STR_BYTES: Final = MAX_FRAME_SIZE
_MAX_IPC_CONTAINER: Final = 4096
_MAX_CONTROL_CONTAINER: Final = 65536
#: Nesting of a control reply's ``result`` (the ``--json`` objects are shallow).
_MAX_RESULT_DEPTH: Final = 32

_MAX_PID: Final = 2**31 - 1  # pid_t is a signed 32-bit int
_MAX_COUNTER: Final = 2**63 - 1
_MAX_HOST_LEN: Final = 255
_STATES: Final = ("new", "connecting", "connected", "disconnected", "failed", "closed")
_PATHS: Final = ("direct", "relay")
_CANDIDATE_TYPES: Final = ("host", "srflx", "prflx", "relay")
_RELAY_TRANSPORTS: Final = ("udp", "tcp", "tls")


class IpcError(RemoteProtocolError):
    """An IPC or control message was rejected: the peer process sent something invalid.

    The only exception the ``decode_*`` functions of this module raise. The
    message is one line, fit for a log.
    """


def new_worker_id() -> str:
    """A fresh random worker id: ``w-`` and 64 random bits as 16 lowercase hex digits."""
    return "w-" + secrets.token_hex(8)


# --- field validation (shared by construction and decoding) -------------------


def _as_seconds(where: str, value: object, *, zero_ok: bool) -> float:
    """``value`` as a float number of seconds; an int is accepted (msgpack may carry one)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        invalid(where, f"must be a number, not {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:
        invalid(where, "too large")
    if not math.isfinite(seconds):
        invalid(where, "must be finite")
    if seconds < 0 or (seconds == 0 and not zero_ok):
        invalid(where, "must be >= 0" if zero_ok else "must be > 0")
    return seconds


def _check_tuple(where: str, value: object) -> tuple[object, ...]:
    # Not a list: the message is frozen, and equal to what decoding builds.
    if not isinstance(value, tuple):
        invalid(where, f"must be a tuple, not {type(value).__name__}")
    return value


# --- worker messages (§3) -----------------------------------------------------
#
# Field names are the wire keys of the body, and field order is wire order.


@dataclass(frozen=True, slots=True)
class Hello:
    """``hello`` (worker → sup): the worker is up and idle."""

    worker: str
    pid: int

    TYPE: ClassVar[str] = "hello"

    def __post_init__(self) -> None:
        if not isinstance(self.worker, str) or not WORKER_ID_RE.fullmatch(self.worker):
            invalid("hello.worker", f"{shorten(self.worker)} is not a worker id (w-<16 hex>)")
        check_int("hello.pid", self.pid, 1, _MAX_PID)


@dataclass(frozen=True, slots=True)
class Assign:
    """``assign`` (sup → worker): run this session.

    ``services`` are ``(name, host, port)`` triples with distinct names; on the
    wire they are a map ``name → [host, port]``, in this order. ``ice_hosts``
    are IP addresses or CIDR networks (``127.0.0.1``, ``10.1.0.0/16``, ``::1``);
    ``ice_policy`` is ``all`` or ``relay``.
    """

    session: str
    device: str
    client: str
    services: tuple[tuple[str, str, int], ...]
    ice_servers: tuple[IceServer, ...] = ()
    ice_hosts: tuple[str, ...] = ()
    ice_policy: IcePolicy = "all"

    TYPE: ClassVar[str] = "assign"

    def __post_init__(self) -> None:
        check_session("assign.session", self.session)
        check_id("assign.device", self.device)
        check_id("assign.client", self.client)
        names: set[str] = set()
        for service in _check_tuple("assign.services", self.services):
            if not isinstance(service, tuple) or len(service) != 3:
                invalid("assign.services", "each service must be a (name, host, port) tuple")
            name, host, port = service
            if not is_valid_service_name(name):
                invalid("assign.services", f"{shorten(name)} is not a valid service name")
            if name in names:
                invalid("assign.services", f"service {name!r} appears twice")
            names.add(name)
            check_str(f"assign.services[{name!r}].host", host, max_chars=_MAX_HOST_LEN)
            if not host:
                invalid(f"assign.services[{name!r}].host", "must not be empty")
            check_int(f"assign.services[{name!r}].port", port, 1, 65535)
        _check_ice("assign", self.ice_servers, self.ice_hosts, self.ice_policy)

    @property
    def ice(self) -> IceConfig:
        return IceConfig(self.ice_servers, self.ice_hosts, self.ice_policy)


def _check_ice(where: str, servers: object, hosts: object, policy: object) -> None:
    for server in _check_tuple(f"{where}.ice_servers", servers):
        if not isinstance(server, IceServer):
            invalid(f"{where}.ice_servers", "each server must be an IceServer")
    for host in _check_tuple(f"{where}.ice_hosts", hosts):
        if not isinstance(host, str):
            invalid(f"{where}.ice_hosts", f"must hold str, not {type(host).__name__}")
        try:
            ipaddress.ip_network(host, strict=False)
        except ValueError:
            invalid(f"{where}.ice_hosts", f"{shorten(host)} is not an IP address or network")
    check_choice(f"{where}.ice_policy", policy, ICE_POLICIES)


@dataclass(frozen=True, slots=True)
class IceUpdate:
    """``ice`` (sup → worker): ICE settings for the sessions to come.

    Sent to idle workers when the settings change (the signaling server handed
    out fresh TURN credentials): an idle worker prepares its offer again with
    them, in the background, so no session starts on expired credentials.
    Same fields and rules as in ``assign``.
    """

    ice_servers: tuple[IceServer, ...] = ()
    ice_hosts: tuple[str, ...] = ()
    ice_policy: IcePolicy = "all"

    TYPE: ClassVar[str] = "ice"

    def __post_init__(self) -> None:
        _check_ice("ice", self.ice_servers, self.ice_hosts, self.ice_policy)

    @property
    def ice(self) -> IceConfig:
        return IceConfig(self.ice_servers, self.ice_hosts, self.ice_policy)

    @classmethod
    def of(cls, ice: IceConfig) -> IceUpdate:
        return cls(ice.servers, ice.hosts, ice.policy)


@dataclass(frozen=True, slots=True)
class Relay:
    """``relay`` (both ways): one signaling message (§1) as its JSON text.

    Not decoded here: the receiver runs ``decode_signaling`` on it. At most one
    signaling frame, :data:`~protocol.signaling.MAX_FRAME_SIZE` bytes of UTF-8.
    """

    session: str
    message: str

    TYPE: ClassVar[str] = "relay"

    def __post_init__(self) -> None:
        check_session("relay.session", self.session)
        check_str("relay.message", self.message, max_bytes=MAX_FRAME_SIZE)
        if not self.message:
            invalid("relay.message", "must not be empty")


@dataclass(frozen=True, slots=True)
class StateReport:
    """``state`` (worker → sup): the peer connection's state and, once known, its path.

    ``state`` is one of ``new connecting connected disconnected failed closed``.
    Once connected: ``pair`` is the nominated candidate pair's local and remote
    candidate types, ``"LOCAL/REMOTE"`` (each ``host``, ``srflx``, ``prflx`` or
    ``relay``); ``path`` is ``relay`` if either of them is ``relay``, else
    ``direct``; ``relay_transport`` is how this side reaches its own relay
    (``udp``, ``tcp``, ``tls``), ``None`` when the relay is the peer's. All
    three are ``None`` until known.
    """

    session: str
    state: str
    path: str | None = None
    pair: str | None = None
    relay_transport: str | None = None

    TYPE: ClassVar[str] = "state"

    def __post_init__(self) -> None:
        check_session("state.session", self.session)
        check_choice("state.state", self.state, _STATES)
        if self.path is not None:
            check_choice("state.path", self.path, _PATHS)
        if self.pair is not None:
            check_str("state.pair", self.pair, max_chars=16)
            local, sep, remote = self.pair.partition("/")
            if not sep or local not in _CANDIDATE_TYPES or remote not in _CANDIDATE_TYPES:
                invalid("state.pair", f"{shorten(self.pair)} is not LOCAL/REMOTE candidate types")
            relayed = "relay" in (local, remote)
            if self.path != ("relay" if relayed else "direct"):
                invalid("state.path", f"{shorten(self.path)} does not match pair {self.pair}")
        elif self.path is not None:
            invalid("state.pair", "must be given with path")
        if self.relay_transport is not None:
            check_choice("state.relay_transport", self.relay_transport, _RELAY_TRANSPORTS)
            if self.pair is None or self.pair.partition("/")[0] != "relay":
                invalid("state.relay_transport", "only for a path through this side's relay")


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """``heartbeat`` (both ways, every second): counters, zeros from the supervisor.

    ``services`` breaks the session's figures down by service: ``(name,
    bytes_in, bytes_out, streams_opened)`` for each service a stream reached,
    distinct names; left out of the wire form when empty.
    """

    bytes_in: int = 0
    bytes_out: int = 0
    streams: int = 0
    services: tuple[tuple[str, int, int, int], ...] = ()

    TYPE: ClassVar[str] = "heartbeat"

    def __post_init__(self) -> None:
        check_int("heartbeat.bytes_in", self.bytes_in, 0, _MAX_COUNTER)
        check_int("heartbeat.bytes_out", self.bytes_out, 0, _MAX_COUNTER)
        check_int("heartbeat.streams", self.streams, 0, _MAX_COUNTER)
        names: set[str] = set()
        for service in _check_tuple("heartbeat.services", self.services):
            if not isinstance(service, tuple) or len(service) != 4:
                invalid("heartbeat.services", "each entry must be (name, in, out, opened)")
            name = service[0]
            if not is_valid_service_name(name):
                invalid("heartbeat.services", f"{shorten(name)} is not a valid service name")
            if name in names:
                invalid("heartbeat.services", f"service {name!r} appears twice")
            names.add(name)
            for key, figure in zip(("bytes_in", "bytes_out", "streams"), service[1:], strict=True):
                check_int(f"heartbeat.services[{name!r}].{key}", figure, 0, _MAX_COUNTER)


@dataclass(frozen=True, slots=True)
class Ended:
    """``ended`` (worker → sup): the session is over; the worker exits next.

    ``clean`` is true when a peer hung up, false on a failure.
    """

    session: str
    reason: str
    clean: bool

    TYPE: ClassVar[str] = "ended"

    def __post_init__(self) -> None:
        check_session("ended.session", self.session)
        check_str("ended.reason", self.reason, max_chars=MAX_REASON_LEN)
        check_bool("ended.clean", self.clean)


@dataclass(frozen=True, slots=True)
class Drain:
    """``drain`` (sup → worker): refuse new streams, end when the last one closes
    or after ``timeout`` seconds (> 0, finite; an int is stored as a float)."""

    timeout: float

    TYPE: ClassVar[str] = "drain"

    def __post_init__(self) -> None:
        # Frozen dataclass: normalising a field needs object.__setattr__.
        object.__setattr__(
            self, "timeout", _as_seconds("drain.timeout", self.timeout, zero_ok=False)
        )


@dataclass(frozen=True, slots=True)
class Stop:
    """``stop`` (sup → worker): end the session now.

    ``reason`` becomes the ``session_end`` reason sent to the peer, hence the
    same 200-character limit.
    """

    reason: str

    TYPE: ClassVar[str] = "stop"

    def __post_init__(self) -> None:
        check_str("stop.reason", self.reason, max_chars=MAX_REASON_LEN)


@dataclass(frozen=True, slots=True)
class Release:
    """``release`` (sup → worker): the session's negotiation was given up; drop it
    and go back to the pool (answer ``released``), or, if it connected meanwhile,
    end it without telling the client (answer ``ended``) and exit."""

    session: str
    reason: str

    TYPE: ClassVar[str] = "release"

    def __post_init__(self) -> None:
        check_session("release.session", self.session)
        check_str("release.reason", self.reason, max_chars=MAX_REASON_LEN)


@dataclass(frozen=True, slots=True)
class Released:
    """``released`` (worker → sup): the session is dropped, a fresh offer is being
    prepared; the worker is idle again, as after ``hello``."""

    session: str

    TYPE: ClassVar[str] = "released"

    def __post_init__(self) -> None:
        check_session("released.session", self.session)


IpcMessage: TypeAlias = (
    Hello
    | Assign
    | IceUpdate
    | Relay
    | StateReport
    | Heartbeat
    | Ended
    | Drain
    | Stop
    | Release
    | Released
)

_MESSAGE_CLASSES: Final[tuple[type[IpcMessage], ...]] = (
    Hello,
    Assign,
    IceUpdate,
    Relay,
    StateReport,
    Heartbeat,
    Ended,
    Drain,
    Stop,
    Release,
    Released,
)
_MESSAGE_TYPES: Final[Mapping[str, type[IpcMessage]]] = {cls.TYPE: cls for cls in _MESSAGE_CLASSES}
_FIELD_NAMES: Final[Mapping[type[IpcMessage], tuple[str, ...]]] = {
    cls: tuple(f.name for f in fields(cls)) for cls in _MESSAGE_CLASSES
}
_ICE_SERVER_KEYS: Final = ("url", "username", "credential")
#: Body keys that may be left out (the field's default then applies).
_OPTIONAL_FIELDS: Final[Mapping[type[IpcMessage], tuple[str, ...]]] = {Heartbeat: ("services",)}


# --- msgpack ------------------------------------------------------------------


def _pack(obj: object, limit: int, what: str) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    if len(data) > limit:
        raise LocalProtocolError(f"{what} of {len(data)} bytes exceeds {limit}")
    return data


def _reject_ext(code: int, data: bytes) -> NoReturn:
    raise IpcError(f"msgpack ext type {code} is not allowed")


def _map_without_duplicates(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    # A plain dict keeps the last duplicate: a sender could then show one value
    # to a lenient reader and another to us.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise IpcError("duplicate key in a msgpack map")
    return obj


def _unpack(data: object, limit: int, container: int, what: str) -> object:
    if isinstance(data, bytearray | memoryview):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise IpcError(f"{what} must be bytes, not {type(data).__name__}")
    if len(data) > limit:
        raise IpcError(f"{what} of {len(data)} bytes exceeds {limit}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            object_pairs_hook=_map_without_duplicates,
            ext_hook=_reject_ext,
            max_str_len=_MAX_STR_BYTES,
            max_bin_len=0,
            max_array_len=container,
            max_map_len=container,
            # 0, not only ext_hook: the timestamp type (-1) never reaches ext_hook.
            max_ext_len=0,
        )
    except IpcError:
        raise
    except msgpack.ExtraData:
        raise IpcError(f"{what}: trailing bytes after the msgpack value") from None
    except msgpack.StackError:
        raise IpcError(f"{what}: msgpack nested too deeply") from None
    except msgpack.FormatError:
        raise IpcError(f"{what}: not valid msgpack") from None
    except UnicodeDecodeError:
        raise IpcError(f"{what}: a msgpack str is not valid UTF-8") from None
    except (msgpack.UnpackException, ValueError, TypeError, OverflowError, RecursionError) as exc:
        # Truncated input, a length over a bound, a non-str map key ...
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise IpcError(f"{what}: not valid msgpack: {detail}") from None


def _check_keys(
    where: str, obj: Mapping[Any, Any], expected: tuple[str, ...], optional: tuple[str, ...] = ()
) -> None:
    unknown = [key for key in obj if key not in expected]
    if unknown:
        raise IpcError(f"{where}: unknown key {shorten(unknown[0])}")
    missing = [key for key in expected if key not in obj and key not in optional]
    if missing:
        raise IpcError(f"{where}: missing key {missing[0]!r}")


def _check_version(where: str, obj: Mapping[Any, Any]) -> None:
    # Version first: a newer version may have other keys and types.
    if "v" not in obj:
        raise IpcError(f"{where}: missing key 'v'")
    version = obj["v"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise IpcError(f"{where}: 'v' must be an int, not {type(version).__name__}")
    if version != IPC_VERSION:
        raise IpcError(f"{where}: version {version} is not supported (this side speaks 1)")


def _top_map(data: object, limit: int, container: int, what: str) -> dict[Any, Any]:
    obj = _unpack(data, limit, container, what)
    if not isinstance(obj, dict):
        raise IpcError(f"{what} must be a msgpack map, not {type(obj).__name__}")
    _check_version(what, obj)
    return obj


# --- worker messages: wire form -----------------------------------------------


def _body(message: IpcMessage) -> dict[str, object]:
    body = {name: getattr(message, name) for name in _FIELD_NAMES[type(message)]}
    if isinstance(message, Assign):
        body["services"] = {name: [host, port] for name, host, port in message.services}
    if isinstance(message, Assign | IceUpdate):
        body["ice_servers"] = [
            {"url": s.url, "username": s.username, "credential": s.credential}
            for s in message.ice_servers
        ]
        body["ice_hosts"] = list(message.ice_hosts)
    if isinstance(message, Heartbeat):
        if message.services:
            body["services"] = {name: list(figures) for name, *figures in message.services}
        else:
            del body["services"]
    return body


def encode_ipc(message: IpcMessage) -> bytes:
    """The envelope of ``message`` as msgpack bytes (§3).

    Raises :class:`LocalProtocolError` if ``message`` is not an IPC message or
    its encoding exceeds :data:`MAX_IPC_MESSAGE`.
    """
    if type(message) not in _FIELD_NAMES:
        raise LocalProtocolError(f"not an IPC message: {type(message).__name__}")
    envelope = {"v": IPC_VERSION, "t": message.TYPE, "b": _body(message)}
    return _pack(envelope, MAX_IPC_MESSAGE, f"{message.TYPE} message")


def _assign_fields(body: dict[str, Any]) -> dict[str, Any]:
    services = body["services"]
    if not isinstance(services, dict):
        raise IpcError("assign.services: must be a map of name -> [host, port]")
    triples = []
    for name, address in services.items():
        if not isinstance(address, list) or len(address) != 2:
            raise IpcError(f"assign.services[{shorten(name)}]: must be [host, port]")
        triples.append((name, address[0], address[1]))
    return _ice_fields("assign", body) | {"services": tuple(triples)}


def _ice_fields(where: str, body: dict[str, Any]) -> dict[str, Any]:
    servers = body["ice_servers"]
    if not isinstance(servers, list):
        raise IpcError(f"{where}.ice_servers: must be an array")
    specs = []
    for server in servers:
        if not isinstance(server, dict):
            raise IpcError(f"{where}.ice_servers: each server must be a map")
        _check_keys(f"{where}.ice_servers", server, _ICE_SERVER_KEYS)
        try:
            specs.append(IceServer(server["url"], server["username"], server["credential"]))
        except ValueError as exc:
            raise IpcError(f"{where}.ice_servers: {exc}") from None
    hosts = body["ice_hosts"]
    if not isinstance(hosts, list):
        raise IpcError(f"{where}.ice_hosts: must be an array")
    return body | {"ice_servers": tuple(specs), "ice_hosts": tuple(hosts)}


def _heartbeat_fields(body: dict[str, Any]) -> dict[str, Any]:
    services = body.get("services", {})
    if not isinstance(services, dict):
        raise IpcError("heartbeat.services: must be a map of name -> [in, out, opened]")
    entries = []
    for name, figures in services.items():
        if not isinstance(figures, list) or len(figures) != 3:
            raise IpcError(f"heartbeat.services[{shorten(name)}]: must be [in, out, opened]")
        entries.append((name, *figures))
    return body | {"services": tuple(entries)}


def decode_ipc(data: bytes | bytearray | memoryview) -> IpcMessage:
    """Decode one supervisor ↔ worker message (§3). Raises only :class:`IpcError`."""
    obj = _top_map(data, MAX_IPC_MESSAGE, _MAX_IPC_CONTAINER, "IPC message")
    _check_keys("IPC message", obj, ("v", "t", "b"))
    type_ = obj["t"]
    if not isinstance(type_, str):
        raise IpcError(f"IPC message: 't' must be a str, not {type(type_).__name__}")
    cls = _MESSAGE_TYPES.get(type_)
    if cls is None:
        raise IpcError(f"IPC message: unknown type {shorten(type_)}")
    body = obj["b"]
    if not isinstance(body, dict):
        raise IpcError(f"{type_}: body 'b' must be a map, not {type(body).__name__}")
    _check_keys(type_, body, _FIELD_NAMES[cls], _OPTIONAL_FIELDS.get(cls, ()))
    try:
        if cls is Assign:
            body = _assign_fields(body)
        elif cls is IceUpdate:
            body = _ice_fields("ice", body)
        elif cls is Heartbeat:
            body = _heartbeat_fields(body)
        return cls(**body)
    except LocalProtocolError as exc:
        raise IpcError(str(exc)) from None


# --- control endpoint (§4) ----------------------------------------------------

_COMMAND_ARGS: Final[Mapping[str, tuple[str, ...]]] = {
    "status": (),
    "sessions": (),
    "kill": ("session",),
    "stop": ("drain_timeout",),
}
#: Keys a command may leave out (then the supervisor's configured value applies).
_OPTIONAL_ARGS: Final[frozenset[str]] = frozenset({"drain_timeout"})


def _empty_args() -> Mapping[str, object]:
    return types.MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ControlRequest:
    """A CLI → supervisor request (§4): ``status``, ``sessions``, ``kill``, ``stop``.

    ``args`` per command: ``{}`` for ``status`` and ``sessions``,
    ``{"session": id}`` for ``kill``, ``{"drain_timeout": seconds}`` (>= 0,
    finite; optional, the supervisor's configured value otherwise) for
    ``stop``. It is kept as a read-only copy, ``drain_timeout`` as a
    float; read it through :attr:`session` and :attr:`drain_timeout`.
    """

    cmd: str
    args: Mapping[str, object] = field(default_factory=_empty_args)

    def __post_init__(self) -> None:
        check_choice("control request cmd", self.cmd, CONTROL_COMMANDS)
        where = f"{self.cmd} args"
        if not isinstance(self.args, Mapping):
            invalid(where, f"must be a mapping, not {type(self.args).__name__}")
        expected = _COMMAND_ARGS[self.cmd]
        unknown = [key for key in self.args if key not in expected]
        if unknown:
            invalid(where, f"unknown key {shorten(unknown[0])}")
        missing = [key for key in expected if key not in self.args and key not in _OPTIONAL_ARGS]
        if missing:
            invalid(where, f"missing key {missing[0]!r}")
        args = dict(self.args)
        if "session" in args:
            check_session(f"{where}.session", args["session"])
        if "drain_timeout" in args:
            args["drain_timeout"] = _as_seconds(
                f"{where}.drain_timeout", args["drain_timeout"], zero_ok=True
            )
        object.__setattr__(self, "args", types.MappingProxyType(args))

    @property
    def session(self) -> str | None:
        """The session to kill (``kill``), else ``None``."""
        value = self.args.get("session")
        return value if isinstance(value, str) else None

    @property
    def drain_timeout(self) -> float | None:
        """Seconds to let sessions drain (``stop``), else ``None``."""
        value = self.args.get("drain_timeout")
        return value if isinstance(value, float) else None


def _plain(where: str, value: object, depth: int = 0) -> object:
    """``value`` as plain msgpack/JSON data: a fresh copy, tuples as lists.

    Floats must be finite: the result is printed by ``--json``, and JSON has no NaN.
    """
    if depth > _MAX_RESULT_DEPTH:
        invalid(where, f"nested deeper than {_MAX_RESULT_DEPTH}")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        check_int(where, value, -(2**63), 2**64 - 1)
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            invalid(where, f"{value} is not a finite float")
        return value
    if isinstance(value, str):
        check_str(where, value)
        return value
    if isinstance(value, list | tuple):
        return [_plain(where, item, depth + 1) for item in value]
    if isinstance(value, Mapping):
        plain: dict[str, object] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                invalid(where, f"map key {shorten(key)} is not a str")
            check_str(f"{where} key", key)
            plain[key] = _plain(where, item, depth + 1)
        return plain
    invalid(where, f"{type(value).__name__} is not plain data (map, array, str, number, bool, nil)")


@dataclass(frozen=True, slots=True)
class ControlReply:
    """A supervisor → CLI reply (§4).

    ``ok=True``: ``result`` is plain data (dict with str keys, list, str, int,
    finite float, bool, None; tuples become lists) and ``error`` is None.
    ``ok=False``: ``error`` is a non-empty one-line message and ``result`` is None.
    """

    ok: bool
    result: object = None
    error: str | None = None

    def __post_init__(self) -> None:
        check_bool("reply.ok", self.ok)
        if self.ok:
            if self.error is not None:
                invalid("reply.error", "must be None when ok")
            object.__setattr__(self, "result", _plain("reply.result", self.result))
        else:
            check_str("reply.error", self.error)
            if not self.error:
                invalid("reply.error", "must not be empty when not ok")
            if self.result is not None:
                invalid("reply.result", "must be None when not ok")


def encode_control_request(req: ControlRequest) -> bytes:
    """``{"v": 1, "cmd": ..., "args": {...}}`` as msgpack (§4)."""
    if not isinstance(req, ControlRequest):
        raise LocalProtocolError(f"not a ControlRequest: {type(req).__name__}")
    obj = {"v": IPC_VERSION, "cmd": req.cmd, "args": dict(req.args)}
    return _pack(obj, MAX_CONTROL_MESSAGE, "control request")


def decode_control_request(data: bytes | bytearray | memoryview) -> ControlRequest:
    """Decode a control request (§4). Raises only :class:`IpcError`."""
    obj = _top_map(data, MAX_CONTROL_MESSAGE, _MAX_CONTROL_CONTAINER, "control request")
    _check_keys("control request", obj, ("v", "cmd", "args"))
    cmd, args = obj["cmd"], obj["args"]
    if not isinstance(cmd, str):
        raise IpcError(f"control request: 'cmd' must be a str, not {type(cmd).__name__}")
    if cmd not in CONTROL_COMMANDS:
        raise IpcError(f"control request: unknown command {shorten(cmd)}")
    if not isinstance(args, dict):
        raise IpcError(f"control request: 'args' must be a map, not {type(args).__name__}")
    try:
        return ControlRequest(cmd, args)
    except LocalProtocolError as exc:
        raise IpcError(str(exc)) from None


def encode_control_reply(rep: ControlReply) -> bytes:
    """``{"v": 1, "ok": ..., "result": ..., "error": ...}`` as msgpack (§4).

    Raises :class:`LocalProtocolError` if the encoding exceeds
    :data:`MAX_CONTROL_MESSAGE`; the supervisor then replies with an error.
    """
    if not isinstance(rep, ControlReply):
        raise LocalProtocolError(f"not a ControlReply: {type(rep).__name__}")
    obj = {"v": IPC_VERSION, "ok": rep.ok, "result": rep.result, "error": rep.error}
    return _pack(obj, MAX_CONTROL_MESSAGE, "control reply")


def decode_control_reply(data: bytes | bytearray | memoryview) -> ControlReply:
    """Decode a control reply (§4). Raises only :class:`IpcError`."""
    obj = _top_map(data, MAX_CONTROL_MESSAGE, _MAX_CONTROL_CONTAINER, "control reply")
    _check_keys("control reply", obj, ("v", "ok", "result", "error"))
    try:
        return ControlReply(obj["ok"], obj["result"], obj["error"])
    except LocalProtocolError as exc:
        raise IpcError(str(exc)) from None
