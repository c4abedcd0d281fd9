"""Sans-I/O routing core of the signaling server (PROTOCOL.md §1.3-§1.6).

No sockets and no clock: the adapter (``signaling/server.py``) identifies each
authenticated WebSocket by an opaque, hashable connection id, feeds frames in
with the current monotonic time, and carries out the actions that come back::

    router = Router()
    actions = router.connect(conn, identity, now)   # -> [Send(conn, Welcome)]
    actions = router.receive(conn, frame, now)      # for every frame received
    actions = router.disconnect(conn)               # once the socket is gone

Every method returns a list of :class:`Send` (encode the message and send it
to that connection) and :class:`Close` (close that connection with that code).
Actions for one connection are ordered; carry them out in order. After a
:class:`Close` for a connection the router ignores its frames and already
treats it as gone (its sessions ended, its device unregistered); still call
:meth:`Router.disconnect` when the socket is closed.

What the router enforces:

* the per-connection token bucket (§1.5): over the rate a frame is dropped
  with ``error rate_limited``; ``max_drops_in_row`` drops in a row close 4429;
* decoding (§1.1): an invalid frame gets an ``error`` and is never forwarded;
* who may send what (``forbidden``), then the session state machine of §1.4,
  written as the explicit table ``TRANSITIONS`` (anything not in it is
  ``bad_state``);
* presence: "newest registration wins" (the older link gets ``error replaced``
  and close 4409), ``device_offline``, ``peer_left`` when a party's link goes;
* the session limits of §1.5 (``too_many_sessions``).

Forwarded messages are the decoded, validated values (re-encoded by the
adapter), never the frames that came in.

On several nodes (PROTOCOL.md §1.8) the same router runs on each; a party on
another node is a :class:`RemoteConn`. What is sent to one comes out as a
:class:`Relay` (the adapter publishes it to that node), what arrives from one
goes in through :meth:`Router.receive_remote`, and the adapter reports the
presence it learns (:meth:`Router.remote_registered`,
:meth:`Router.remote_unregistered`) and the parties it cannot reach
(:meth:`Router.remote_gone`, :meth:`Router.node_gone`). Registrations and
their ends come out as :class:`Presence` for the adapter to announce; a
server on its own ignores them.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections import Counter
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from protocol.errors import SignalingError
from protocol.signaling import (
    MAX_LISTED_DEVICES,
    PEER_ROLES,
    Answer,
    Auth,
    Candidate,
    CloseCode,
    DeviceInfo,
    Devices,
    Error,
    ErrorCode,
    ListDevices,
    Offer,
    PeerLeft,
    PeerRole,
    Register,
    Registered,
    Revoke,
    SessionEnd,
    SessionRequest,
    SignalingMessage,
    Welcome,
    decode_signaling,
)
from signaling.auth import Identity
from signaling.errors import UsageError

__all__ = [
    "TRANSITIONS",
    "Action",
    "Close",
    "ConnId",
    "Limits",
    "Presence",
    "Relay",
    "RemoteConn",
    "RouteState",
    "Router",
    "Send",
]

ConnId: TypeAlias = Hashable


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``message`` to connection ``conn``."""

    conn: ConnId
    message: SignalingMessage


@dataclass(frozen=True, slots=True)
class Close:
    """Close connection ``conn`` with WebSocket close ``code`` and ``reason``."""

    conn: ConnId
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class RemoteConn:
    """A party's connection on another signaling node: connection ``conn`` of ``node``."""

    node: str
    conn: int


@dataclass(frozen=True, slots=True)
class Relay:
    """Send ``message`` to ``to``, a party on another node, as coming from the
    local party ``origin`` (``role``, ``sub``)."""

    to: RemoteConn
    origin: ConnId
    role: PeerRole
    sub: str
    message: SignalingMessage


@dataclass(frozen=True, slots=True)
class Presence:
    """Device ``device`` registered on local connection ``conn`` (``online``),
    or that registration ended."""

    device: str
    conn: ConnId
    online: bool
    services: tuple[str, ...] = ()


Action: TypeAlias = Send | Close | Relay | Presence

# Errors from a remote party's node meaning its side of the session does not
# exist (any more): the local copy ends too.
_ENDS_REMOTE_SESSION: Final = frozenset(
    {
        ErrorCode.DEVICE_OFFLINE,
        ErrorCode.UNKNOWN_SESSION,
        ErrorCode.SESSION_EXISTS,
        ErrorCode.TOO_MANY_SESSIONS,
        ErrorCode.FORBIDDEN,
    }
)


@dataclass(frozen=True, slots=True)
class Limits:
    """The §1.5 limits; the defaults are the spec's values."""

    rate: float = 20.0
    burst: int = 100
    # A device's one connection carries the signaling of all its sessions.
    device_rate: float = 200.0
    device_burst: int = 1000
    max_drops_in_row: int = 200
    max_negotiating_per_device: int = 16
    # Per device and client identity, however many connections it uses: well
    # below the device's total, so one client cannot hold every slot.
    max_negotiating_per_client: int = 4
    max_sessions_per_client: int = 64
    max_sessions_per_device: int = 1024

    def __post_init__(self) -> None:
        for rate in (self.rate, self.device_rate):
            if not (math.isfinite(rate) and rate > 0):
                raise ValueError("rates must be positive numbers of messages per second")
        for name in (
            "burst",
            "device_burst",
            "max_drops_in_row",
            "max_negotiating_per_device",
            "max_negotiating_per_client",
            "max_sessions_per_client",
            "max_sessions_per_device",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


class RouteState(enum.Enum):
    """Server-side state of one session (§1.4)."""

    PENDING = "pending"  # request forwarded to the device, no offer yet
    OFFERED = "offered"  # offer forwarded to the client, no answer yet
    ACTIVE = "active"  # answer forwarded; only candidates and session_end remain


_NEGOTIATING: Final = frozenset({RouteState.PENDING, RouteState.OFFERED})

# §1.4 as data: (state, message type, sender role) -> next state, or None when
# the message ends the session. A key that is absent is ``bad_state``.
# session_request is not here: it creates a session rather than moving one.
TRANSITIONS: Final[Mapping[tuple[RouteState, str, PeerRole], RouteState | None]] = {
    (RouteState.PENDING, Offer.TYPE, "device"): RouteState.OFFERED,
    (RouteState.OFFERED, Answer.TYPE, "client"): RouteState.ACTIVE,
    **{(state, Candidate.TYPE, role): state for state in RouteState for role in PEER_ROLES},
    **{(state, SessionEnd.TYPE, role): None for state in RouteState for role in PEER_ROLES},
}

# Which role may send each client-to-server type at all (else ``forbidden``).
# Types missing here (welcome, registered, peer_left, error) are server-only.
_SENDERS: Final[Mapping[str, frozenset[PeerRole]]] = {
    Auth.TYPE: frozenset(PEER_ROLES),
    Register.TYPE: frozenset({"device"}),
    ListDevices.TYPE: frozenset({"client"}),
    SessionRequest.TYPE: frozenset({"client"}),
    Offer.TYPE: frozenset({"device"}),
    Answer.TYPE: frozenset({"client"}),
    Candidate.TYPE: frozenset(PEER_ROLES),
    SessionEnd.TYPE: frozenset(PEER_ROLES),
}


@dataclass(slots=True)
class _TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; time is injected."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    def take(self, now: float) -> bool:
        if now > self.stamp:  # a clock that goes backwards refills nothing
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@dataclass(slots=True, eq=False)
class _Conn:
    conn: ConnId
    identity: Identity
    bucket: _TokenBucket
    drops_in_row: int = 0
    closing: bool = False
    # What a registered device exposes (names only), for list_devices.
    services: tuple[str, ...] = ()
    # Session ids this connection is a party of; a dict keeps insertion order
    # so peer_left goes out in a stable order.
    sessions: dict[str, None] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class _Session:
    id: str
    client: _Conn
    device: _Conn
    state: RouteState = RouteState.PENDING

    def other(self, party: _Conn) -> _Conn:
        return self.device if party is self.client else self.client


class Router:
    """Presence and session routing for authenticated signaling connections.

    Call :meth:`connect` once per authenticated connection, :meth:`receive` for
    each frame it sends, :meth:`disconnect` when it is gone; carry out the
    returned actions in order. :meth:`stats` reports counters.
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits if limits is not None else Limits()
        self._conns: dict[ConnId, _Conn] = {}
        self._devices: dict[str, _Conn] = {}  # device id -> its registered link
        self._sessions: dict[str, _Session] = {}
        self._counters: Counter[str] = Counter()
        # Devices registered on other nodes, and the remote parties of sessions.
        self._remote_devices: dict[str, RemoteConn] = {}
        self._remote_services: dict[str, tuple[str, ...]] = {}
        self._remote: dict[RemoteConn, _Conn] = {}
        self._addressed: _Conn | None = None  # the local party of the relay in hand

    # --- public API ----------------------------------------------------------

    def connect(self, conn: ConnId, identity: Identity, now: float) -> list[Action]:
        """Start tracking ``conn``, authenticated as ``identity``; returns its ``welcome``.

        Raises :class:`UsageError` if ``conn`` is already connected.
        """
        if conn in self._conns:
            raise UsageError(f"connection {conn!r} is already connected")
        limits = self.limits
        rate, burst = (
            (limits.device_rate, limits.device_burst)
            if identity.role == "device"
            else (limits.rate, limits.burst)
        )
        bucket = _TokenBucket(rate, burst, burst, now)
        self._conns[conn] = _Conn(conn, identity, bucket)
        self._counters["connections_total"] += 1
        return [Send(conn, Welcome(identity.sub, identity.role))]

    def receive(self, conn: ConnId, data: str | bytes, now: float) -> list[Action]:
        """Handle one frame (``str`` text, ``bytes`` binary) from ``conn`` at time ``now``.

        Raises :class:`UsageError` if ``conn`` is not connected.
        """
        c = self._conns.get(conn)
        if c is None:
            raise UsageError(f"connection {conn!r} is not connected")
        if c.closing:
            return []
        self._counters["messages_received"] += 1

        # Rate first, before any parsing: garbage costs the sender tokens too.
        if not c.bucket.take(now):
            c.drops_in_row += 1
            self._counters["messages_dropped"] += 1
            if c.drops_in_row >= self.limits.max_drops_in_row:
                return self._close(c, CloseCode.RATE_LIMITED, "rate limit exceeded")
            return [self._error(c, ErrorCode.RATE_LIMITED, "too many messages, slow down")]
        c.drops_in_row = 0

        try:
            msg = decode_signaling(data)
        except SignalingError as exc:
            return [self._error(c, exc.code, exc.message)]

        senders = _SENDERS.get(msg.TYPE)
        if senders is None:
            return [self._error(c, ErrorCode.FORBIDDEN, f"{msg.TYPE} is sent by the server only")]
        if c.identity.role not in senders:
            return [
                self._error(
                    c,
                    ErrorCode.FORBIDDEN,
                    f"a {c.identity.role} may not send {msg.TYPE}",
                    getattr(msg, "session", None),
                )
            ]

        if isinstance(msg, SessionRequest | Answer | Candidate | SessionEnd) and msg.client:
            return [
                self._error(c, ErrorCode.BAD_MESSAGE, "client is set by the server", msg.session)
            ]

        match msg:
            case Auth():
                return [self._error(c, ErrorCode.BAD_STATE, "already authenticated")]
            case Register():
                return self._register(c, msg)
            case ListDevices():
                return self._list_devices(c)
            case SessionRequest():
                actions = self._request_session(c, msg)
                self._count_request(actions)
                return actions
            case Offer() | Answer() | Candidate() | SessionEnd():
                return self._route(c, msg)
            case _:  # pragma: no cover - _SENDERS lists exactly the cases above
                raise AssertionError(msg.TYPE)

    def disconnect(self, conn: ConnId) -> list[Action]:
        """Forget ``conn``: its sessions end with ``peer_left`` to the other party.

        Idempotent: an unknown ``conn`` returns no actions.
        """
        c = self._conns.pop(conn, None)
        if c is None:
            return []
        return [] if c.closing else self._teardown(c)

    def revoke(
        self, *, sub: str | None = None, jti: str | None = None, reason: str
    ) -> list[Action]:
        """Close (4401 ``reason``) every link of identity ``sub`` or of token ``jti``,
        and tell every online device to end the sessions of each client concerned.

        A revoked ``sub`` is told to devices even with no link (its sessions
        outlive its signaling); a ``jti`` only through the links that used it.
        """
        actions: list[Action] = []
        clients = {sub} if sub is not None else set()
        for c in list(self._conns.values()):
            if c.closing or not (c.identity.sub == sub or (jti and c.identity.jti == jti)):
                continue
            if c.identity.role == "client":
                clients.add(c.identity.sub)
            actions += self._close(c, CloseCode.AUTH_FAILED, reason)
        for client in sorted(clients):
            for device in self._devices.values():
                actions.append(Send(device.conn, Revoke(client, reason)))
                self._counters["messages_routed"] += 1
        return actions

    def expire(self, conn: ConnId, reason: str) -> list[Action]:
        """The token of ``conn`` expired: close it (4401 ``reason``); a client's
        sessions are ended by the devices its token granted."""
        c = self._conns.get(conn)
        if c is None or c.closing:
            return []
        actions = self._close(c, CloseCode.AUTH_FAILED, reason)
        if c.identity.role == "client":
            for device_id in sorted(c.identity.devices):
                device = self._device_party(device_id)
                if device is not None:
                    actions.append(self._forward(device, Revoke(c.identity.sub, reason), c))
        return actions

    def stats(self) -> dict[str, int]:
        """Gauges (``connections``, ``devices_online``, ``sessions``) and counters.

        Counters: ``connections_total``, ``messages_received``,
        ``messages_routed`` (forwarded to the other party),
        ``messages_dropped`` (rate limit), ``device_lists`` (``list_devices``
        answered), ``errors.<code>`` (``error``
        messages sent, by code), ``closes.<code>`` (closes the router asked for),
        ``registrations``, ``session_requests.<outcome>`` (``forwarded`` or the
        error code of the refusal), ``sessions_established`` (answers forwarded).
        Gauges by role: ``connections.<role>``.
        """
        roles = Counter(c.identity.role for c in self._conns.values() if not c.closing)
        stats = {
            "connections": len(self._conns),
            **{f"connections.{role}": roles[role] for role in PEER_ROLES},
            "devices_online": len(self._devices),
            "sessions": len(self._sessions),
            "connections_total": 0,
            "messages_received": 0,
            "messages_routed": 0,
            "messages_dropped": 0,
            "device_lists": 0,
            "registrations": 0,
            "sessions_established": 0,
        }
        stats.update(self._counters)
        return stats

    def is_online(self, device: str) -> bool:
        """Whether ``device`` has a registered link."""
        return device in self._devices

    def is_connected(self, conn: ConnId) -> bool:
        """Whether ``conn`` is connected and not being closed (may be sent to)."""
        c = self._conns.get(conn)
        return c is not None and not c.closing

    # --- other nodes (PROTOCOL.md §1.8) ---------------------------------------

    def receive_remote(
        self, to: ConnId, sender: RemoteConn, role: PeerRole, sub: str, message: SignalingMessage
    ) -> list[Action]:
        """Handle ``message`` relayed from ``sender`` (``role`` ``sub``) on
        another node to the local connection ``to``, whose node checked the
        sender's rate, grant and message already.

        Raises :class:`UsageError` unless :meth:`is_connected` (``to``): the
        adapter answers such relays ``gone`` instead.
        """
        local = self._conns.get(to)
        if local is None or local.closing:
            raise UsageError(f"connection {to!r} is not connected")
        remote = self._remote.get(sender) or _remote_conn(sender, role, sub)
        self._counters["messages_from_nodes"] += 1
        self._addressed = local
        try:
            return self._receive_remote(local, remote, message)
        finally:
            self._addressed = None

    def _receive_remote(
        self, local: _Conn, remote: _Conn, message: SignalingMessage
    ) -> list[Action]:
        role = remote.identity.role
        match message:
            case SessionRequest() if role == "client":
                return self._open_from_remote(remote, local, message)
            case Offer() | Answer() | Candidate() | SessionEnd():
                return self._route(remote, message)
            case PeerLeft() | Error() if message.session in remote.sessions:
                session = self._sessions[message.session]
                other = session.other(remote)
                if isinstance(message, PeerLeft) or message.code in _ENDS_REMOTE_SESSION:
                    self._end_session(session)
                if isinstance(message, PeerLeft):
                    owner = session.client.identity.sub if other is session.device else None
                    message = PeerLeft(session.id, client=owner)
                return [self._forward(other, message, remote)]
            case Revoke() if self._devices.get(local.identity.sub) is local:
                return [self._forward(local, message, remote)]
            case _:
                self._counters["messages_from_nodes_dropped"] += 1
                return []

    def remote_registered(
        self, device: str, at: RemoteConn, services: tuple[str, ...] = ()
    ) -> list[Action]:
        """``device`` registered on another node, with ``services``, more
        recently than here (the adapter orders registrations cluster-wide): a
        local registration is replaced, as by a newer one here."""
        actions: list[Action] = []
        local = self._devices.get(device)
        if local is not None:
            actions += self._replace(local, device)
        self._remote_devices[device] = at
        self._remote_services[device] = services
        return actions

    def remote_unregistered(self, device: str, at: RemoteConn) -> None:
        """The registration of ``device`` at ``at`` ended (a newer one stays)."""
        if self._remote_devices.get(device) == at:
            self._forget_remote_device(device)

    def _forget_remote_device(self, device: str) -> None:
        self._remote_devices.pop(device, None)
        self._remote_services.pop(device, None)

    def remote_gone(
        self, at: RemoteConn, undelivered: SignalingMessage | None = None
    ) -> list[Action]:
        """The party ``at`` cannot be reached (gone, or its node is):
        ``undelivered``, if a ``session_request``, gets its client
        ``device_offline``; every other session with ``at`` ends with
        ``peer_left`` to its local party."""
        for device, where in list(self._remote_devices.items()):
            if where == at:
                self._forget_remote_device(device)
        c = self._remote.get(at)
        if c is None:
            return []
        actions: list[Action] = []
        if isinstance(undelivered, SessionRequest) and undelivered.session in c.sessions:
            session = self._sessions[undelivered.session]
            self._end_session(session)
            actions.append(
                self._error(
                    session.client,
                    ErrorCode.DEVICE_OFFLINE,
                    f"device {undelivered.device} is offline",
                    session.id,
                )
            )
        actions += self._teardown(c)
        self._remote.pop(at, None)
        return actions

    def node_gone(self, node: str) -> list[Action]:
        """Every party on ``node`` is gone (:meth:`remote_gone` for each)."""
        actions: list[Action] = []
        for device, where in list(self._remote_devices.items()):
            if where.node == node:
                self._forget_remote_device(device)
        for at in [at for at in self._remote if at.node == node]:
            actions += self.remote_gone(at)
        return actions

    def remote_nodes(self) -> set[str]:
        """The other nodes this router holds presence or sessions of."""
        return {at.node for at in self._remote_devices.values()} | {at.node for at in self._remote}

    # --- handlers ------------------------------------------------------------

    def _register(self, c: _Conn, msg: Register) -> list[Action]:
        if msg.device != c.identity.sub:
            return [
                self._error(
                    c,
                    ErrorCode.FORBIDDEN,
                    f"this token may only register device {c.identity.sub}",
                )
            ]
        actions: list[Action] = []
        previous = self._devices.get(msg.device)
        if previous is not None and previous is not c:
            actions += self._replace(previous, msg.device)
        self._devices[msg.device] = c
        self._forget_remote_device(msg.device)
        c.services = msg.services
        self._counters["registrations"] += 1
        actions.append(Send(c.conn, Registered(msg.device)))
        actions.append(Presence(msg.device, c.conn, online=True, services=msg.services))
        return actions

    def _replace(self, previous: _Conn, device: str) -> list[Action]:
        # Newest wins (§1.6): a device back from a network drop must not be
        # locked out by its own stale link.
        return [
            self._error(previous, ErrorCode.REPLACED, f"device {device} registered elsewhere"),
            *self._close(previous, CloseCode.REPLACED, "replaced by a newer connection"),
        ]

    def _list_devices(self, c: _Conn) -> list[Action]:
        # Only the devices the token grants: a client learns nothing, not even
        # presence, about the others. An offline device's services are unknown.
        entries = []
        for device in sorted(c.identity.devices):
            link = self._devices.get(device)
            if link is not None:
                entries.append(DeviceInfo(device, True, link.services))
            elif device in self._remote_devices:
                entries.append(DeviceInfo(device, True, self._remote_services[device]))
            else:
                entries.append(DeviceInfo(device, False, ()))
        self._counters["device_lists"] += 1
        step = MAX_LISTED_DEVICES
        pages = [entries[i : i + step] for i in range(0, len(entries), step)] or [[]]
        return [
            Send(c.conn, Devices(tuple(page), more=i < len(pages) - 1))
            for i, page in enumerate(pages)
        ]

    def _request_session(self, c: _Conn, msg: SessionRequest) -> list[Action]:
        sid = msg.session
        # Grant before presence: a client learns nothing about devices it may
        # not reach, not even whether they are online.
        if not c.identity.may_reach(msg.device):
            return [
                self._error(
                    c, ErrorCode.FORBIDDEN, f"token does not grant device {msg.device}", sid
                )
            ]
        if sid in self._sessions:
            return [self._error(c, ErrorCode.SESSION_EXISTS, f"session {sid} exists", sid)]
        device = self._device_party(msg.device)
        if device is None:
            return [
                self._error(c, ErrorCode.DEVICE_OFFLINE, f"device {msg.device} is offline", sid)
            ]
        return self._open(c, device, msg)

    def _open_from_remote(self, c: _Conn, device: _Conn, msg: SessionRequest) -> list[Action]:
        # No second hop: the client's node sent it where the device was.
        sid = msg.session
        if self._devices.get(msg.device) is not device:
            return [
                self._error(c, ErrorCode.DEVICE_OFFLINE, f"device {msg.device} is offline", sid)
            ]
        if sid in self._sessions:
            return [self._error(c, ErrorCode.SESSION_EXISTS, f"session {sid} exists", sid)]
        return self._open(c, device, msg)

    def _open(self, c: _Conn, device: _Conn, msg: SessionRequest) -> list[Action]:
        sid = msg.session
        too_many = self._session_limit_problem(c, device)
        if too_many is not None:
            return [self._error(c, ErrorCode.TOO_MANY_SESSIONS, too_many, sid)]
        self._sessions[sid] = _Session(sid, client=c, device=device)
        for party in (c, device):
            party.sessions[sid] = None
            if isinstance(party.conn, RemoteConn):
                self._remote[party.conn] = party
        forwarded = SessionRequest(sid, msg.device, client=c.identity.sub)
        return [self._forward(device, forwarded, c)]

    def _device_party(self, device: str) -> _Conn | None:
        """The link of ``device``, here or on another node."""
        local = self._devices.get(device)
        if local is not None:
            return local
        at = self._remote_devices.get(device)
        if at is None:
            return None
        return self._remote.get(at) or _remote_conn(at, "device", device)

    def _session_limit_problem(self, client: _Conn, device: _Conn) -> str | None:
        limits = self.limits
        if len(client.sessions) >= limits.max_sessions_per_client:
            return f"at most {limits.max_sessions_per_client} sessions per client connection"
        if len(device.sessions) >= limits.max_sessions_per_device:
            return f"at most {limits.max_sessions_per_device} sessions per device"
        negotiating = [
            s for sid in device.sessions if (s := self._sessions[sid]).state in _NEGOTIATING
        ]
        if len(negotiating) >= limits.max_negotiating_per_device:
            return (
                f"at most {limits.max_negotiating_per_device} sessions "
                "may be negotiating with a device"
            )
        sub = client.identity.sub
        if sum(1 for s in negotiating if s.client.identity.sub == sub) >= (
            limits.max_negotiating_per_client
        ):
            return (
                f"at most {limits.max_negotiating_per_client} sessions of one client "
                "may be negotiating with a device"
            )
        return None

    def _route(self, c: _Conn, msg: Offer | Answer | Candidate | SessionEnd) -> list[Action]:
        sid = msg.session
        session = self._sessions.get(sid)
        if session is None or sid not in c.sessions:
            # Same answer whether the session exists or not: no probing (§1.4).
            return [
                self._error(
                    c, ErrorCode.UNKNOWN_SESSION, f"no session {sid} on this connection", sid
                )
            ]
        key = (session.state, msg.TYPE, c.identity.role)
        if key not in TRANSITIONS:
            return [
                self._error(
                    c,
                    ErrorCode.BAD_STATE,
                    f"{msg.TYPE} is not allowed in state {session.state.value}",
                    sid,
                )
            ]
        next_state = TRANSITIONS[key]
        other = session.other(c)
        if next_state is None:
            self._end_session(session)
        else:
            if (
                next_state is RouteState.ACTIVE
                and session.state is not RouteState.ACTIVE
                and not isinstance(c.conn, RemoteConn)  # counted once, on the client's node
            ):
                self._counters["sessions_established"] += 1
            session.state = next_state
        if isinstance(msg, Answer | Candidate | SessionEnd) and other is session.device:
            # The device checks every message against the session's owner: the
            # server's table does not survive a restart, the device's does.
            msg = dataclasses.replace(msg, client=c.identity.sub)
        return [self._forward(other, msg, c)]

    # --- helpers -------------------------------------------------------------

    def _forward(self, to: _Conn, msg: SignalingMessage, origin: _Conn) -> Send | Relay:
        self._counters["messages_routed"] += 1
        if isinstance(to.conn, RemoteConn):
            self._counters["messages_to_nodes"] += 1
            return Relay(to.conn, origin.conn, origin.identity.role, origin.identity.sub, msg)
        return Send(to.conn, msg)

    def _count_request(self, actions: list[Action]) -> None:
        message = actions[0].message if isinstance(actions[0], Send) else None
        outcome = message.code if isinstance(message, Error) else "forwarded"
        self._counters[f"session_requests.{outcome}"] += 1

    def _error(self, c: _Conn, code: str, message: str, session: str | None = None) -> Send | Relay:
        self._counters[f"errors.{code}"] += 1
        error = Error(code, message, session)
        if isinstance(c.conn, RemoteConn):
            # Only a relay gets a remote party an error: it comes from the
            # party the relay addressed (its node matches errors by session).
            origin = self._addressed
            assert origin is not None, "errors to other nodes answer relays"
            return Relay(c.conn, origin.conn, origin.identity.role, origin.identity.sub, error)
        return Send(c.conn, error)

    def _close(self, c: _Conn, code: int, reason: str) -> list[Action]:
        # Treat the connection as gone right away: its sessions and its device
        # registration must not wait for the socket's closing handshake.
        self._counters[f"closes.{code}"] += 1
        actions = self._teardown(c)
        c.closing = True
        return [Close(c.conn, code, reason), *actions]

    def _teardown(self, c: _Conn) -> list[Action]:
        actions: list[Action] = []
        if c.identity.role == "device" and self._devices.get(c.identity.sub) is c:
            del self._devices[c.identity.sub]
            actions.append(Presence(c.identity.sub, c.conn, online=False))
        for sid in list(c.sessions):
            session = self._sessions[sid]
            other = session.other(c)
            self._end_session(session)
            owner = session.client.identity.sub if other is session.device else None
            peer_left = PeerLeft(sid, client=owner)
            if isinstance(other.conn, RemoteConn):
                actions.append(self._forward(other, peer_left, c))
            else:
                actions.append(Send(other.conn, peer_left))
        return actions

    def _end_session(self, session: _Session) -> None:
        del self._sessions[session.id]
        for party in (session.client, session.device):
            party.sessions.pop(session.id, None)
            if isinstance(party.conn, RemoteConn) and not party.sessions:
                self._remote.pop(party.conn, None)


def _remote_conn(at: RemoteConn, role: PeerRole, sub: str) -> _Conn:
    # Its node keeps its rate; this bucket is never drawn from.
    return _Conn(at, Identity(sub, role), _TokenBucket(math.inf, math.inf, math.inf, 0.0))
