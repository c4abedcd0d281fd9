"""Identifiers used by every layer (PROTOCOL.md, "Identifiers")."""

from __future__ import annotations

import re
import secrets
from typing import Final, TypeGuard

__all__ = [
    "ID_PATTERN",
    "SESSION_ID_PATTERN",
    "is_valid_id",
    "is_valid_session_id",
    "new_session_id",
]

#: Device, client and service ids (PROTOCOL.md, "Identifiers").
ID_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
#: Session ids, chosen at random by the client.
SESSION_ID_PATTERN: Final = r"[A-Za-z0-9_-]{8,64}"

# fullmatch, not match + "$": "$" would also accept a trailing newline.
_ID_RE: Final = re.compile(ID_PATTERN)
_SESSION_ID_RE: Final = re.compile(SESSION_ID_PATTERN)


def is_valid_id(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a device, client or service id."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def is_valid_session_id(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a session id."""
    return isinstance(value, str) and _SESSION_ID_RE.fullmatch(value) is not None


def new_session_id() -> str:
    """A fresh random session id: 128 bits, 22 URL-safe characters."""
    return secrets.token_urlsafe(16)
