"""HTTP heads of HTTP streams: PROTOCOL.md §2.8 (fields: RFC 9110; HTTP/1.1: RFC 9112).

An HTTP stream opens with OPEN_HTTP, whose payload ends in a *request head*,
and the device answers with HEAD, a *response head*. Both are small JSON
objects a browser builds with ``JSON.stringify``; header names and values are
strings whose characters U+0000-U+00FF stand for bytes (the Fetch standard's
ByteString), so any byte a server sends in a field survives the trip.

Public API:

* :class:`RequestHead`, :class:`ResponseHead`: frozen, slotted values that
  validate when built (:class:`~protocol.errors.LocalProtocolError` if our code
  builds one the wire cannot carry). Header fields are ``(name, value)`` byte
  pairs, in order, names as sent (compare them lower-cased).
* :func:`encode_request_head` / :func:`encode_response_head`: value to JSON bytes,
  byte-exact as the spec's test vectors.
* :func:`decode_request_head` / :func:`decode_response_head`: untrusted bytes to
  a value, or :class:`HeadError` saying what is wrong (the stream is then reset
  ``BAD_HEAD``; the session goes on).
* :func:`end_to_end_fields`: a head's fields minus the hop-by-hop ones (RFC 9110
  §7.6.1), which never cross the tunnel; :func:`is_upgrade_request`.

The rules are the ones h11 applies to what it sends, so a head that decodes
here is one the device's HTTP/1.1 client can write.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, TypeAlias

from protocol.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "HOP_BY_HOP",
    "MAX_FIELDS",
    "MAX_HEAD_SIZE",
    "Field",
    "HeadError",
    "RequestHead",
    "ResponseHead",
    "decode_request_head",
    "decode_response_head",
    "encode_request_head",
    "encode_response_head",
    "end_to_end_fields",
    "field_values",
    "is_upgrade_request",
]

MAX_HEAD_SIZE: Final = 16384
MAX_FIELDS: Final = 128
MAX_METHOD_LEN: Final = 32
MAX_TARGET_LEN: Final = 8192
MAX_NAME_LEN: Final = 256
MAX_VALUE_LEN: Final = 8192
MAX_REASON_LEN: Final = 256

#: RFC 9110 §7.6.1 and the fields RFC 9112 ties to one connection; ``proxy-*``
#: is matched by prefix. Fields named in ``Connection`` are hop-by-hop too.
HOP_BY_HOP: Final = frozenset(
    {b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)

Field: TypeAlias = tuple[bytes, bytes]

_TOKEN: Final = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
# h11's field-value rule: no NUL, CR or LF, no white space at either end.
_FIELD_VALUE: Final = re.compile(rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")
_TARGET: Final = re.compile(rb"/[\x21-\x7e]*")
_REQUEST_KEYS: Final = ("method", "target", "headers")
_RESPONSE_KEYS: Final = ("status", "reason", "headers")


class HeadError(RemoteProtocolError):
    """A received HTTP head breaks PROTOCOL.md §2.8: reset the stream ``BAD_HEAD``."""


def _fields_problem(headers: object) -> str | None:
    if not isinstance(headers, tuple):
        return "headers must be a tuple of (name, value) byte pairs"
    if len(headers) > MAX_FIELDS:
        return f"{len(headers)} header fields, at most {MAX_FIELDS}"
    for item in headers:
        if not (isinstance(item, tuple) and len(item) == 2):
            return "a header field must be a (name, value) pair"
        name, value = item
        if not isinstance(name, bytes) or not isinstance(value, bytes):
            return "header names and values must be bytes"
        if len(name) > MAX_NAME_LEN or not _TOKEN.fullmatch(name):
            return f"bad header name {name[:40]!r}"
        if len(value) > MAX_VALUE_LEN:
            return f"header {name.decode('ascii')!r}: value of {len(value)} bytes"
        if not _FIELD_VALUE.fullmatch(value):
            return f"header {name.decode('ascii')!r}: illegal value {value[:40]!r}"
    return None


def _request_problem(method: object, target: object, headers: object) -> str | None:
    if not isinstance(method, str) or not method.isascii():
        return "method must be an ASCII string"
    if not 1 <= len(method) <= MAX_METHOD_LEN or not _TOKEN.fullmatch(method.encode()):
        return f"bad method {method[:40]!r}"
    if method.upper() == "CONNECT":
        return "method CONNECT is refused: the device is not a proxy"
    if not isinstance(target, str) or not target.isascii():
        return "target must be an ASCII string"
    if len(target) > MAX_TARGET_LEN:
        return f"target of {len(target)} characters, at most {MAX_TARGET_LEN}"
    if not _TARGET.fullmatch(target.encode()):
        return f"bad target {target[:40]!r}: must be origin-form (/path?query)"
    return _fields_problem(headers)


def _response_problem(status: object, reason: object, headers: object) -> str | None:
    if not isinstance(status, int) or isinstance(status, bool):
        return "status must be an integer"
    if status != 101 and not 200 <= status <= 599:
        return f"bad status {status}: must be 101 or 200-599"
    if not isinstance(reason, bytes):
        return "reason must be bytes"
    if len(reason) > MAX_REASON_LEN or not _FIELD_VALUE.fullmatch(reason):
        return f"bad reason {reason[:40]!r}"
    return _fields_problem(headers)


@dataclass(frozen=True, slots=True)
class RequestHead:
    """What the client asks the service: ``method target`` and header fields."""

    method: str
    target: str
    headers: tuple[Field, ...] = ()

    def __post_init__(self) -> None:
        problem = _request_problem(self.method, self.target, self.headers)
        if problem is not None:
            raise LocalProtocolError(f"request head: {problem}")


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """What the service answered: status, reason phrase and header fields."""

    status: int
    reason: bytes = b""
    headers: tuple[Field, ...] = ()

    def __post_init__(self) -> None:
        problem = _response_problem(self.status, self.reason, self.headers)
        if problem is not None:
            raise LocalProtocolError(f"response head: {problem}")


def _encode(obj: dict[str, object]) -> bytes:
    # ensure_ascii=False writes U+0080-U+00FF as UTF-8, as JSON.stringify does.
    encoded = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(encoded) > MAX_HEAD_SIZE:
        raise LocalProtocolError(f"head of {len(encoded)} bytes, at most {MAX_HEAD_SIZE}")
    return encoded


def _json_fields(headers: tuple[Field, ...]) -> list[list[str]]:
    return [[name.decode("latin-1"), value.decode("latin-1")] for name, value in headers]


def encode_request_head(head: RequestHead) -> bytes:
    """The JSON text of ``head`` (§2.8); ``LocalProtocolError`` if over the size limit."""
    return _encode(
        {"method": head.method, "target": head.target, "headers": _json_fields(head.headers)}
    )


def encode_response_head(head: ResponseHead) -> bytes:
    """The JSON text of ``head`` (§2.8); ``LocalProtocolError`` if over the size limit."""
    return _encode(
        {
            "status": head.status,
            "reason": head.reason.decode("latin-1"),
            "headers": _json_fields(head.headers),
        }
    )


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            # A lenient reader would keep the last one; two readers could disagree.
            raise HeadError(f"key {key[:40]!r} twice")
        result[key] = value
    return result


def _no_constant(name: str) -> object:
    raise HeadError(f"{name} is not JSON")


def _decode_object(raw: bytes, keys: tuple[str, ...]) -> dict[str, object]:
    if len(raw) > MAX_HEAD_SIZE:
        raise HeadError(f"head of {len(raw)} bytes, at most {MAX_HEAD_SIZE}")
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise HeadError(f"head is not UTF-8: {exc.reason}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError; huge ints; deep nesting
        raise HeadError(f"head is not JSON: {str(exc)[:80]}") from None
    if not isinstance(obj, dict):
        raise HeadError("head must be a JSON object")
    if tuple(sorted(obj)) != tuple(sorted(keys)):
        raise HeadError(f"head must have exactly the keys {', '.join(keys)}")
    return obj


def _bytes_of(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise HeadError(f"{what} must be a string")
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        raise HeadError(f"{what} has a character above U+00FF (not a byte)") from None


def _decode_fields(headers: object) -> tuple[Field, ...]:
    if not isinstance(headers, list):
        raise HeadError("headers must be an array of [name, value] pairs")
    if len(headers) > MAX_FIELDS:
        raise HeadError(f"{len(headers)} header fields, at most {MAX_FIELDS}")
    fields: list[Field] = []
    for item in headers:
        if not (isinstance(item, list) and len(item) == 2):
            raise HeadError("a header field must be a [name, value] pair")
        fields.append((_bytes_of(item[0], "a header name"), _bytes_of(item[1], "a header value")))
    return tuple(fields)


def decode_request_head(raw: bytes) -> RequestHead:
    """The request head in ``raw`` (an OPEN_HTTP payload's tail); :class:`HeadError` if bad."""
    obj = _decode_object(raw, _REQUEST_KEYS)
    method, target = obj["method"], obj["target"]
    headers = _decode_fields(obj["headers"])
    problem = _request_problem(method, target, headers)
    if problem is not None:
        raise HeadError(problem)
    assert isinstance(method, str) and isinstance(target, str)  # checked above
    return RequestHead(method, target, headers)


def decode_response_head(raw: bytes) -> ResponseHead:
    """The response head in ``raw`` (a HEAD payload); :class:`HeadError` if bad."""
    obj = _decode_object(raw, _RESPONSE_KEYS)
    status = obj["status"]
    reason = _bytes_of(obj["reason"], "reason")
    headers = _decode_fields(obj["headers"])
    problem = _response_problem(status, reason, headers)
    if problem is not None:
        raise HeadError(problem)
    assert isinstance(status, int)  # checked above
    return ResponseHead(status, reason, headers)


def field_values(headers: Iterable[Field], name: bytes) -> list[bytes]:
    """The values of every field called ``name`` (lower case), in order."""
    return [value for field_name, value in headers if field_name.lower() == name]


def _connection_tokens(headers: Iterable[Field]) -> set[bytes]:
    tokens: set[bytes] = set()
    for value in field_values(headers, b"connection"):
        tokens.update(token.strip().lower() for token in value.split(b",") if token.strip())
    return tokens


def is_upgrade_request(head: RequestHead) -> bool:
    """Whether ``head`` asks to switch protocols (``Connection: upgrade`` and an
    ``Upgrade`` field, RFC 9110 §7.8), as a WebSocket handshake does."""
    return b"upgrade" in _connection_tokens(head.headers) and bool(
        field_values(head.headers, b"upgrade")
    )


def end_to_end_fields(
    headers: Iterable[Field], *, drop: frozenset[bytes] = frozenset(), keep_upgrade: bool = False
) -> list[Field]:
    """``headers`` without the hop-by-hop fields (and those named in ``drop``),
    names lower-cased. With ``keep_upgrade``, ``Connection: upgrade`` and
    ``Upgrade`` pass (a protocol switch must reach the service)."""
    headers = list(headers)
    named = _connection_tokens(headers)
    kept: list[Field] = []
    for name, value in headers:
        lower = name.lower()
        if keep_upgrade and lower == b"upgrade":
            kept.append((lower, value))
            continue
        if lower in HOP_BY_HOP or lower in named or lower.startswith(b"proxy-") or lower in drop:
            continue
        kept.append((lower, value))
    if keep_upgrade:
        kept.append((b"connection", b"upgrade"))
    return kept
