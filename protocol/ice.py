"""ICE server URLs (RFC 7064 ``stun:``/``stuns:``, RFC 7065 ``turn:``/``turns:``).

One syntax for every place that accepts an ICE server (CLI flags, the TOML
config, the supervisor's ``assign`` message, aiortc's configuration), as far
as aiortc understands it: ``SCHEME:HOST[:PORT][?transport=udp|tcp]``.
"""

from __future__ import annotations

import re
from typing import Final

ICE_URL_RE: Final = re.compile(
    r"(stun|stuns|turn|turns):(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)"
    r"(:(?P<port>\d{1,5}))?(\?transport=(udp|tcp))?"
)


#: Seconds without an answered ICE consent check (RFC 7675) after which a path is
#: dead: ``--keepalive`` of ``start`` and ``connect``, ``keepalive`` in the TOML.
DEFAULT_KEEPALIVE: Final = 5.0
MIN_KEEPALIVE: Final = 1.0
MAX_KEEPALIVE: Final = 300.0


def check_keepalive(seconds: float) -> None:
    """Raise ValueError with a one-line reason unless ``seconds`` is a usable keepalive."""
    if not MIN_KEEPALIVE <= seconds <= MAX_KEEPALIVE:  # NaN fails too
        raise ValueError(
            f"keepalive must be {MIN_KEEPALIVE:g}-{MAX_KEEPALIVE:g} seconds, got {seconds:g}"
        )


def check_ice_url(url: str) -> None:
    """Raise ValueError with a one-line reason unless ``url`` is a usable ICE URL."""
    if "@" in url:  # not echoed: "turn:user:password@host" is a common mistake
        raise ValueError("bad ICE server URL: give the username and credential separately")
    match = ICE_URL_RE.fullmatch(url)
    if match is None or not 1 <= int(match["port"] or 3478) <= 65535:
        raise ValueError(
            f"bad ICE server URL {url!r}: expected stun:HOST[:PORT] or "
            "turn:HOST[:PORT][?transport=udp|tcp] (or stuns:, turns:)"
        )


def check_ice_server(url: str, username: str | None, credential: str | None) -> None:
    """Raise ValueError with a one-line reason unless this is a usable ICE server."""
    check_ice_url(url)
    if url.startswith("turn") and (not username or not credential):
        raise ValueError(f"TURN server {url} needs a username and a password")
