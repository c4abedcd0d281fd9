"""ICE server URLs (RFC 7064 ``stun:``/``stuns:``, RFC 7065 ``turn:``/``turns:``).

One syntax for every place that accepts an ICE server (CLI flags, the TOML
config, the supervisor's ``assign`` message, aiortc's configuration), as far
as aiortc understands it: ``SCHEME:HOST[:PORT][?transport=udp|tcp]``.
"""

from __future__ import annotations

import re
from typing import Final

ICE_URL_RE: Final = re.compile(
    r"(stun|stuns|turn|turns):(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?(\?transport=(udp|tcp))?"
)


def check_ice_server(url: str, username: str | None, credential: str | None) -> None:
    """Raise ValueError with a one-line reason unless this is a usable ICE server."""
    if not ICE_URL_RE.fullmatch(url):
        raise ValueError(
            f"bad ICE server URL {url!r}: expected stun:HOST[:PORT] or "
            "turn:HOST[:PORT][?transport=udp|tcp]"
        )
    if url.startswith("turn") and (not username or not credential):
        raise ValueError(f"TURN server {url} needs a username and a password")
