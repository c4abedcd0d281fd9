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


Action: TypeAlias = Send | Close


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
                actions.append(self._forward(device, Revoke(client, reason)))
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
                device = self._devices.get(device_id)
                if device is not None:
                    actions.append(self._forward(device, Revoke(c.identity.sub, reason)))
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
            # Newest wins (§1.6): a device back from a network drop must not be
            # locked out by its own stale link.
            actions.append(
                self._error(
                    previous, ErrorCode.REPLACED, f"device {msg.device} registered elsewhere"
                )
            )
            actions += self._close(previous, CloseCode.REPLACED, "replaced by a newer connection")
        self._devices[msg.device] = c
        c.services = msg.services
        self._counters["registrations"] += 1
        actions.append(Send(c.conn, Registered(msg.device)))
        return actions

    def _list_devices(self, c: _Conn) -> list[Action]:
        # Only the devices the token grants: a client learns nothing, not even
        # presence, about the others. An offline device's services are unknown.
        entries = []
        for device in sorted(c.identity.devices):
            link = self._devices.get(device)
            services = link.services if link is not None else ()
            entries.append(DeviceInfo(device, link is not None, services))
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
        device = self._devices.get(msg.device)
        if device is None:
            return [
                self._error(c, ErrorCode.DEVICE_OFFLINE, f"device {msg.device} is offline", sid)
            ]
        too_many = self._session_limit_problem(c, device)
        if too_many is not None:
            return [self._error(c, ErrorCode.TOO_MANY_SESSIONS, too_many, sid)]

        self._sessions[sid] = _Session(sid, client=c, device=device)
        c.sessions[sid] = None
        device.sessions[sid] = None
        forwarded = SessionRequest(sid, msg.device, client=c.identity.sub)
        return [self._forward(device, forwarded)]

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
            if next_state is RouteState.ACTIVE and session.state is not RouteState.ACTIVE:
                self._counters["sessions_established"] += 1
            session.state = next_state
        if isinstance(msg, Answer | Candidate | SessionEnd) and other is session.device:
            # The device checks every message against the session's owner: the
            # server's table does not survive a restart, the device's does.
            msg = dataclasses.replace(msg, client=c.identity.sub)
        return [self._forward(other, msg)]

    # --- helpers -------------------------------------------------------------

    def _forward(self, to: _Conn, msg: SignalingMessage) -> Send:
        self._counters["messages_routed"] += 1
        return Send(to.conn, msg)

    def _count_request(self, actions: list[Action]) -> None:
        message = actions[0].message if isinstance(actions[0], Send) else None
        outcome = message.code if isinstance(message, Error) else "forwarded"
        self._counters[f"session_requests.{outcome}"] += 1

    def _error(self, c: _Conn, code: str, message: str, session: str | None = None) -> Send:
        self._counters[f"errors.{code}"] += 1
        return Send(c.conn, Error(code, message, session))

    def _close(self, c: _Conn, code: int, reason: str) -> list[Action]:
        # Treat the connection as gone right away: its sessions and its device
        # registration must not wait for the socket's closing handshake.
        self._counters[f"closes.{code}"] += 1
        actions = self._teardown(c)
        c.closing = True
        return [Close(c.conn, code, reason), *actions]

    def _teardown(self, c: _Conn) -> list[Action]:
        if c.identity.role == "device" and self._devices.get(c.identity.sub) is c:
            del self._devices[c.identity.sub]
        actions: list[Action] = []
        for sid in list(c.sessions):
            session = self._sessions[sid]
            other = session.other(c)
            self._end_session(session)
            owner = session.client.identity.sub if other is session.device else None
            actions.append(Send(other.conn, PeerLeft(sid, client=owner)))
        return actions

    def _end_session(self, session: _Session) -> None:
        del self._sessions[session.id]
        session.client.sessions.pop(session.id, None)
        session.device.sessions.pop(session.id, None)
