"""The ICE servers the signaling server hands out (PROTOCOL.md §1.3 ``ice_servers``).

TURN servers get short-lived credentials of coturn's shared-secret "TURN REST
API" scheme (coturn ``use-auth-secret`` + ``static-auth-secret``;
draft-uberti-behave-turn-rest-00, :func:`protocol.ice.turn_rest_credential`):
username ``EXPIRY:ID`` where ID is the peer's token ``sub``, password the
base64 HMAC-SHA1 of the username under the shared secret. Devices and clients
then need no TURN password of their own, and a leaked credential expires.

Pure: time is an argument. The server (:mod:`signaling.server`) sends
``issue()`` before ``welcome`` and again every :attr:`IceIssuer.refresh_interval`
seconds, so that a peer always holds credentials with at least half their
lifetime left.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Final

from protocol.ice import IceServer, parse_ice_url, turn_rest_credential
from protocol.signaling import MAX_ICE_SERVERS, MAX_ICE_TTL, IceServers
from signaling.errors import ServerConfigError

__all__ = ["DEFAULT_TURN_TTL", "MIN_TURN_TTL", "IceIssuer", "load_turn_secret"]

DEFAULT_TURN_TTL: Final = 3600
#: Shorter lifetimes would have peers re-gathering all the time.
MIN_TURN_TTL: Final = 60
_MIN_SECRET_LEN: Final = 16


def load_turn_secret(path: str) -> str:
    """The shared secret in ``path`` (coturn's ``static-auth-secret``), stripped.

    Raises :class:`ServerConfigError`; the message names the file, never its content.
    """
    try:
        secret = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ServerConfigError(
            f"cannot read TURN secret file {path}: {exc.strerror or exc}"
        ) from None
    except UnicodeDecodeError:
        raise ServerConfigError(f"TURN secret file {path} is not UTF-8 text") from None
    if len(secret) < _MIN_SECRET_LEN:
        raise ServerConfigError(
            f"TURN secret file {path} holds fewer than {_MIN_SECRET_LEN} characters; "
            "make one with: openssl rand -hex 32"
        )
    return secret


class IceIssuer:
    """The servers to hand out; TURN ones with REST credentials minted per peer.

    ``urls`` are ICE server URLs (``stun:``, ``turn:``, ``turns:``). A TURN URL
    needs ``secret``; a ``secret`` needs a TURN URL. ``ttl`` is the credentials'
    lifetime in seconds. Raises :class:`ServerConfigError`.
    """

    def __init__(
        self, urls: Sequence[str], secret: str | None = None, ttl: int = DEFAULT_TURN_TTL
    ) -> None:
        if len(urls) > MAX_ICE_SERVERS:
            raise ServerConfigError(f"at most {MAX_ICE_SERVERS} --ice-server")
        parsed = []
        for url in urls:
            try:
                parsed.append((url, parse_ice_url(url).is_turn))
            except ValueError as exc:
                raise ServerConfigError(str(exc)) from None
        has_turn = any(is_turn for _, is_turn in parsed)
        if has_turn and secret is None:
            raise ServerConfigError("a turn: or turns: --ice-server needs --turn-secret-file")
        if secret is not None and not has_turn:
            raise ServerConfigError("--turn-secret-file needs a turn: or turns: --ice-server")
        if not MIN_TURN_TTL <= ttl <= MAX_ICE_TTL:
            raise ServerConfigError(f"--turn-ttl must be {MIN_TURN_TTL}-{MAX_ICE_TTL} seconds")
        self._servers = tuple(parsed)
        self._secret = secret
        self.ttl = ttl

    @property
    def has_turn(self) -> bool:
        return self._secret is not None

    @property
    def refresh_interval(self) -> float | None:
        """Seconds between two ``ice_servers`` to one peer; ``None``: nothing expires."""
        return self.ttl / 2 if self.has_turn else None

    def issue(self, peer: str, now: float) -> IceServers:
        """The ``ice_servers`` message for ``peer`` (a token ``sub``) at Unix time ``now``."""
        expiry = int(now) + self.ttl
        servers = []
        for url, is_turn in self._servers:
            if is_turn and self._secret is not None:
                username, password = turn_rest_credential(self._secret, expiry, peer)
                servers.append(IceServer(url, username, password))
            else:
                servers.append(IceServer(url))
        return IceServers(tuple(servers), self.ttl if self.has_turn else None)

    def __repr__(self) -> str:  # never the secret
        return f"IceIssuer({[url for url, _ in self._servers]!r}, ttl={self.ttl})"
