"""The client's control endpoint: messages (PROTOCOL.md §4.2).

A running ``tunnelctl connect`` listens on a Unix stream socket in its private
runtime directory. A connection carries one request line and one reply line,
both JSON objects (RFC 8259) ending in LF:

* ``{"v": 1, "cmd": "status", "args": {}}`` → the client's state;
* ``{"v": 1, "cmd": "stream", "args": {"device": ID, "service": NAME}}`` → on
  ``ok``, the same connection then carries one tunnel stream's bytes both ways
  (``connect --stdio`` hands its stream over so, as ssh's ControlMaster does).

This module is pure and imports only the standard library: the ``--stdio``
process that speaks it must start fast (it must never load aiortc).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from protocol.errors import RemoteProtocolError

VERSION = 1
#: A request or reply line, LF included. A ``status`` reply of a client with
#: many forwards stays far below it.
MAX_LINE = 1 << 20
COMMANDS = ("status", "stream")
#: ``args`` of each command: key -> required.
_ARGS: dict[str, frozenset[str]] = {
    "status": frozenset(),
    "stream": frozenset({"device", "service"}),
}
_MAX_ID = 128


class ControlMessageError(RemoteProtocolError):
    """A control line that is not valid JSON or not a valid request or reply."""


@dataclass(frozen=True, slots=True)
class ControlRequest:
    cmd: str
    args: dict[str, str]

    def __post_init__(self) -> None:
        if self.cmd not in _ARGS:
            raise ControlMessageError(f"unknown command {self.cmd!r}")
        if set(self.args) != _ARGS[self.cmd]:
            raise ControlMessageError(f"{self.cmd}: args must be exactly {sorted(_ARGS[self.cmd])}")
        for key, value in self.args.items():
            if not isinstance(value, str) or not 0 < len(value) <= _MAX_ID:
                raise ControlMessageError(f"{self.cmd}: {key} must be a string of 1-128 chars")


@dataclass(frozen=True, slots=True)
class ControlReply:
    ok: bool
    result: Any = None
    error: str | None = None

    def __post_init__(self) -> None:
        if self.ok and self.error is not None:
            raise ControlMessageError("a reply with ok true has error null")
        if not self.ok and (not isinstance(self.error, str) or not self.error):
            raise ControlMessageError("a reply with ok false has a non-empty error")


def encode_request(request: ControlRequest) -> bytes:
    return _line({"v": VERSION, "cmd": request.cmd, "args": request.args})


def encode_reply(reply: ControlReply) -> bytes:
    return _line({"v": VERSION, "ok": reply.ok, "result": reply.result, "error": reply.error})


def decode_request(line: bytes) -> ControlRequest:
    obj = _object(line, ("v", "cmd", "args"))
    if not isinstance(obj["cmd"], str) or not isinstance(obj["args"], dict):
        raise ControlMessageError("cmd must be a string and args an object")
    return ControlRequest(obj["cmd"], obj["args"])


def decode_reply(line: bytes) -> ControlReply:
    obj = _object(line, ("v", "ok", "result", "error"))
    if not isinstance(obj["ok"], bool):
        raise ControlMessageError("ok must be a boolean")
    if obj["error"] is not None and not isinstance(obj["error"], str):
        raise ControlMessageError("error must be a string or null")
    return ControlReply(obj["ok"], obj["result"], obj["error"])


def _line(obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"
    if len(data) > MAX_LINE:
        raise ControlMessageError(f"control line of {len(data)} bytes is over {MAX_LINE}")
    return data


def _object(line: bytes, keys: tuple[str, ...]) -> dict[str, Any]:
    if len(line) > MAX_LINE or not line.endswith(b"\n"):
        raise ControlMessageError("a control message is one line ending in LF")
    try:
        obj = json.loads(line, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise ControlMessageError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict) or set(obj) != set(keys):
        raise ControlMessageError(f"expected an object with exactly the keys {list(keys)}")
    if obj["v"] != VERSION or isinstance(obj["v"], bool):
        raise ControlMessageError(f"unsupported version {obj['v']!r}")
    return obj


def _no_constant(name: str) -> float:
    # JSON has no NaN or Infinity; Python's parser accepts them unless told not to.
    raise ValueError(f"{name} is not JSON")


__all__ = [
    "COMMANDS",
    "MAX_LINE",
    "ControlMessageError",
    "ControlReply",
    "ControlRequest",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
]
