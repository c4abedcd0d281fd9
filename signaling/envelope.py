"""What signaling nodes tell each other through Redis (PROTOCOL.md §1.8), sans-I/O.

Four envelopes, each one JSON text: on a node's channel ``tunnelctl:to:NODE``
a :class:`RelayEnvelope` (a §1.3 message for one of its connections) or a
:class:`GoneEnvelope` (the connection a relay named is not there); on
``tunnelctl:presence`` a :class:`PresenceUp` or :class:`PresenceDown`.

``encode_envelope(env) -> str`` and ``decode_envelope(text) -> Envelope``;
decoding raises :class:`EnvelopeError` (one line) for anything that is not
exactly one of them, the embedded message checked by
:func:`protocol.signaling.decode_signaling`. Also the Redis names:
:func:`node_channel`, :func:`node_key`, :func:`device_key`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from protocol.errors import SignalingError
from protocol.signaling import (
    PEER_ROLES,
    PeerRole,
    SignalingMessage,
    decode_signaling,
    encode_signaling,
    is_valid_id,
)

__all__ = [
    "GEN_KEY",
    "PRESENCE_CHANNEL",
    "Envelope",
    "EnvelopeError",
    "GoneEnvelope",
    "PresenceDown",
    "PresenceUp",
    "RelayEnvelope",
    "decode_envelope",
    "device_key",
    "encode_envelope",
    "node_channel",
    "node_key",
]

PREFIX: Final = "tunnelctl:"
PRESENCE_CHANNEL: Final = "tunnelctl:presence"
GEN_KEY: Final = "tunnelctl:gen"
DEVICE_KEY_PATTERN: Final = "tunnelctl:device:*"


def node_channel(node: str) -> str:
    """The channel a node subscribes to for relays to its connections."""
    return f"{PREFIX}to:{node}"


def node_key(node: str) -> str:
    """The key whose presence says ``node`` lives."""
    return f"{PREFIX}node:{node}"


def device_key(device: str) -> str:
    """The key naming the node and connection that hold ``device``'s registration."""
    return f"{PREFIX}device:{device}"


class EnvelopeError(ValueError):
    """An envelope from Redis is malformed (another version, or a bug); one line."""


@dataclass(frozen=True, slots=True)
class RelayEnvelope:
    """``message`` for connection ``to`` of the receiving node, from connection
    ``conn`` of ``node`` (a ``role`` with token ``sub``)."""

    node: str
    conn: int
    role: PeerRole
    sub: str
    to: int
    message: SignalingMessage


@dataclass(frozen=True, slots=True)
class GoneEnvelope:
    """Connection ``conn`` of ``node`` is not there; ``message`` was for it,
    sent by the receiving node's connection ``to``."""

    node: str
    conn: int
    to: int
    message: SignalingMessage


@dataclass(frozen=True, slots=True)
class PresenceUp:
    """``device`` registered on connection ``conn`` of ``node``, generation ``gen``."""

    device: str
    node: str
    conn: int
    gen: int
    services: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PresenceDown:
    """The registration ``gen`` of ``device`` on ``node``/``conn`` ended."""

    device: str
    node: str
    conn: int
    gen: int


Envelope: TypeAlias = RelayEnvelope | GoneEnvelope | PresenceUp | PresenceDown


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def encode_envelope(env: Envelope) -> str:
    """The JSON text of ``env``, keys in the order of PROTOCOL.md §1.8's vectors."""
    match env:
        case RelayEnvelope():
            sender = {"node": env.node, "conn": env.conn, "role": env.role, "sub": env.sub}
            head = {"v": 1, "t": "relay", "from": sender, "to": env.to}
            return f'{_dumps(head)[:-1]},"msg":{encode_signaling(env.message)}}}'
        case GoneEnvelope():
            head = {"v": 1, "t": "gone", "from": {"node": env.node, "conn": env.conn}, "to": env.to}
            return f'{_dumps(head)[:-1]},"msg":{encode_signaling(env.message)}}}'
        case PresenceUp():
            return _dumps(
                {
                    "v": 1,
                    "t": "up",
                    "device": env.device,
                    "node": env.node,
                    "conn": env.conn,
                    "gen": env.gen,
                    "services": list(env.services),
                }
            )
        case PresenceDown():
            return _dumps(
                {
                    "v": 1,
                    "t": "down",
                    "device": env.device,
                    "node": env.node,
                    "conn": env.conn,
                    "gen": env.gen,
                }
            )


_KEYS: Final = {
    "relay": {"v", "t", "from", "to", "msg"},
    "gone": {"v", "t", "from", "to", "msg"},
    "up": {"v", "t", "device", "node", "conn", "gen", "services"},
    "down": {"v", "t", "device", "node", "conn", "gen"},
}


def decode_envelope(text: str | bytes) -> Envelope:
    """Decode one envelope; raises :class:`EnvelopeError`."""
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise EnvelopeError("envelope is not JSON") from None
    if not isinstance(obj, dict) or obj.get("v") != 1:
        raise EnvelopeError("envelope is not a version 1 object")
    kind = obj.get("t")
    if not isinstance(kind, str) or kind not in _KEYS:
        raise EnvelopeError(f"unknown envelope type {kind!r}"[:120])
    if set(obj) != _KEYS[kind]:
        raise EnvelopeError(f"{kind} envelope: expected keys {sorted(_KEYS[kind])}")
    if kind in ("up", "down"):
        device, node = _id(obj, "device"), _id(obj, "node")
        conn, gen = _int(obj, "conn"), _int(obj, "gen")
        if kind == "down":
            return PresenceDown(device, node, conn, gen)
        services = obj["services"]
        if not isinstance(services, list) or not all(is_valid_id(s) for s in services):
            raise EnvelopeError("up envelope: services must be an array of ids")
        return PresenceUp(device, node, conn, gen, tuple(services))
    sender, to = obj["from"], _int(obj, "to")
    if not isinstance(sender, dict):
        raise EnvelopeError(f"{kind} envelope: from must be an object")
    message = _message(obj["msg"])
    if kind == "gone":
        if set(sender) != {"node", "conn"}:
            raise EnvelopeError("gone envelope: from has node and conn")
        return GoneEnvelope(_id(sender, "node"), _int(sender, "conn"), to, message)
    if set(sender) != {"node", "conn", "role", "sub"}:
        raise EnvelopeError("relay envelope: from has node, conn, role and sub")
    role = sender["role"]
    if role not in PEER_ROLES:
        raise EnvelopeError("relay envelope: from.role must be device or client")
    return RelayEnvelope(
        _id(sender, "node"), _int(sender, "conn"), role, _id(sender, "sub"), to, message
    )


def _id(obj: dict[str, Any], key: str) -> str:
    value = obj[key]
    if not isinstance(value, str) or not is_valid_id(value):
        raise EnvelopeError(f"envelope: {key} must be an id")
    return value


def _int(obj: dict[str, Any], key: str) -> int:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise EnvelopeError(f"envelope: {key} must be a non-negative integer")
    return value


def _message(value: object) -> SignalingMessage:
    try:
        return decode_signaling(_dumps(value))
    except SignalingError as exc:
        raise EnvelopeError(f"envelope: msg: {exc.message}") from None
