"""Field validation shared by the message types of :mod:`protocol.signaling` (§1)
and :mod:`protocol.ipc` (§3, §4).

Each check raises :class:`~protocol.errors.LocalProtocolError` with one line,
``"WHERE: PROBLEM"``, where WHERE names the field (``assign.session``); the
decoders turn that into their own remote error. A value is quoted shortened
(:func:`shorten`), so a message never carries a whole untrusted field.
"""

from __future__ import annotations

from typing import NoReturn

from protocol.errors import LocalProtocolError
from protocol.ids import ID_PATTERN, SESSION_ID_PATTERN, is_valid_id, is_valid_session_id

__all__ = [
    "check_bool",
    "check_choice",
    "check_id",
    "check_int",
    "check_session",
    "check_str",
    "invalid",
    "shorten",
]


def invalid(where: str, problem: str) -> NoReturn:
    raise LocalProtocolError(f"{where}: {problem}")


def shorten(value: object) -> str:
    """``repr(value)``, cut to 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_str(
    where: str, value: object, *, max_chars: int | None = None, max_bytes: int | None = None
) -> None:
    """A str, encodable as UTF-8 (no lone surrogate), within the limits given."""
    if not isinstance(value, str):
        invalid(where, f"must be a str, not {type(value).__name__}")
    if max_chars is not None and len(value) > max_chars:
        invalid(where, f"longer than {max_chars} characters")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        invalid(where, "contains a lone UTF-16 surrogate (not encodable as UTF-8)")
    if max_bytes is not None and len(encoded) > max_bytes:
        invalid(where, f"longer than {max_bytes} bytes of UTF-8")


def check_int(where: str, value: object, low: int, high: int) -> None:
    # bool is an int subclass; JSON or msgpack true must not pass as 1.
    if isinstance(value, bool) or not isinstance(value, int):
        invalid(where, f"must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        invalid(where, f"{value} out of range {low}..{high}")


def check_bool(where: str, value: object) -> None:
    if not isinstance(value, bool):
        invalid(where, f"must be a bool, not {type(value).__name__}")


def check_choice(where: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        invalid(where, f"{shorten(value)} is not one of {', '.join(choices)}")


def check_id(where: str, value: object) -> None:
    """A device or client id (PROTOCOL.md, "Identifiers")."""
    if not is_valid_id(value):
        invalid(where, f"{shorten(value)} is not a valid id (expected {ID_PATTERN})")


def check_session(where: str, value: object) -> None:
    """A session id (PROTOCOL.md, "Identifiers")."""
    if not is_valid_session_id(value):
        invalid(
            where, f"{shorten(value)} is not a valid session id (expected {SESSION_ID_PATTERN})"
        )
