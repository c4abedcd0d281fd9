"""ICE servers: one type for every place that names one (RFC 7064, RFC 7065, RFC 8489).

:class:`IceServer` is the W3C ``RTCIceServer`` with one URL. The CLI flags, the
TOML config, the signaling server's ``ice_servers`` message (PROTOCOL.md §1.3),
the supervisor's ``assign``/``ice`` messages (§3) and the workers' aiortc
configuration all carry this one type; each edge validates by building it.

URL syntax, as far as our ICE stack can honour it (anything else is refused
with one line saying why, never passed on to be ignored):

* ``stun:HOST[:PORT]`` (port 3478). ``stuns:`` (STUN over TLS) is refused:
  aioice cannot speak it, and a STUN binding over TLS gives a server-reflexive
  address of a TCP connection that ICE over UDP cannot use anyway.
* ``turn:HOST[:PORT][?transport=udp|tcp]`` (port 3478, UDP by default).
* ``turns:HOST[:PORT][?transport=tcp]`` (TURN over TLS, port 5349);
  ``?transport=udp`` (DTLS) is refused.

HOST is a DNS name, an IPv4 address or an IPv6 address in brackets.

:class:`IceConfig` is everything a peer connection needs to gather: the servers,
the host-address allowlist and the transport policy (``all`` or ``relay``, the
W3C ``RTCIceTransportPolicy``).

:func:`turn_rest_credential` computes the short-lived credentials of coturn's
"TURN REST API" (draft-uberti-behave-turn-rest-00, coturn's ``use-auth-secret``):
username ``EXPIRY:ID``, password ``base64(HMAC-SHA1(secret, username))``.

Credentials never appear in a ``repr`` (``credential`` has ``repr=False``) or in
an error message.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Final, Literal, TypeAlias

__all__ = [
    "ICE_POLICIES",
    "IceConfig",
    "IcePolicy",
    "IceServer",
    "IceUrl",
    "parse_ice_url",
    "turn_rest_credential",
]

IcePolicy: TypeAlias = Literal["all", "relay"]
ICE_POLICIES: Final[tuple[IcePolicy, ...]] = ("all", "relay")

_URL_RE: Final = re.compile(
    r"(?P<scheme>stun|stuns|turn|turns):(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)"
    r"(?::(?P<port>\d{1,5}))?(?:\?transport=(?P<transport>udp|tcp))?"
)
_DEFAULT_PORTS: Final = {"stun": 3478, "turn": 3478, "turns": 5349}
_SYNTAX: Final = (
    "expected stun:HOST[:PORT], turn:HOST[:PORT][?transport=udp|tcp] or turns:HOST[:PORT]"
)
# A username with a ":" is fine (the REST scheme has one); control characters
# would end up in a STUN USERNAME attribute and in logs.
_MAX_CREDENTIAL_LEN: Final = 512


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


@dataclass(frozen=True, slots=True)
class IceUrl:
    """A parsed ICE server URL. ``host`` has no brackets; ``transport`` is ``udp``
    or ``tcp`` for TURN (to the server: ``turns`` is TLS over TCP) and ``None`` for STUN."""

    scheme: Literal["stun", "turn", "turns"]
    host: str
    port: int
    transport: Literal["udp", "tcp"] | None

    @property
    def is_turn(self) -> bool:
        return self.scheme != "stun"

    @property
    def relay_transport(self) -> str | None:
        """How we reach the relay: ``udp``, ``tcp``, ``tls``; ``None`` for STUN."""
        if self.scheme == "turns":
            return "tls"
        return self.transport


def parse_ice_url(url: object) -> IceUrl:
    """Parse an ICE server URL; ValueError with a one-line reason if we cannot honour it."""
    if not isinstance(url, str):
        raise ValueError(f"bad ICE server URL: expected a string, not {type(url).__name__}")
    if "@" in url:  # not echoed: "turn:user:password@host" is a common mistake
        raise ValueError("bad ICE server URL: give the username and credential separately")
    match = _URL_RE.fullmatch(url)
    shown = url if len(url) <= 80 else url[:77] + "..."
    if match is None:
        raise ValueError(f"bad ICE server URL {shown!r}: {_SYNTAX}")
    scheme, host, transport = match["scheme"], match["host"], match["transport"]
    if scheme == "stuns":
        raise ValueError(
            f"ICE server URL {shown!r}: stuns: (STUN over TLS) is not supported; "
            "use stun:, or turns: for TLS to a relay"
        )
    if scheme == "stun" and transport is not None:
        raise ValueError(f"bad ICE server URL {shown!r}: a stun: URL takes no ?transport")
    if scheme == "turns" and transport == "udp":
        raise ValueError(
            f"ICE server URL {shown!r}: TURN over DTLS is not supported; "
            "turns: is TLS over TCP (drop ?transport=udp)"
        )
    port = int(match["port"]) if match["port"] else _DEFAULT_PORTS[scheme]
    if not 1 <= port <= 65535:
        raise ValueError(f"bad ICE server URL {shown!r}: port {port} out of range 1-65535")
    if host.startswith("["):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad ICE server URL {shown!r}: bad IPv6 address") from None
    if scheme == "stun":
        return IceUrl("stun", host, port, None)
    if scheme == "turns":
        return IceUrl("turns", host, port, "tcp")
    return IceUrl("turn", host, port, "tcp" if transport == "tcp" else "udp")


def _check_credential(name: str, value: object) -> None:
    if value is None:
        return
    # The value is never echoed: it may be a password.
    if not isinstance(value, str):
        raise ValueError(f"ICE server {name} must be a string, not {type(value).__name__}")
    if len(value) > _MAX_CREDENTIAL_LEN:
        raise ValueError(f"ICE server {name} is longer than {_MAX_CREDENTIAL_LEN} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise ValueError(f"ICE server {name} contains a control character or lone surrogate")


@dataclass(frozen=True, slots=True)
class IceServer:
    """One STUN or TURN server (the W3C ``RTCIceServer``, one URL).

    Raises ValueError when built with a URL :func:`parse_ice_url` refuses, or a
    TURN server without both a username and a credential.
    """

    url: str
    username: str | None = None
    credential: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        parsed = parse_ice_url(self.url)
        _check_credential("username", self.username)
        _check_credential("credential", self.credential)
        if parsed.is_turn and not (self.username and self.credential):
            raise ValueError(f"TURN server {self.url} needs a username and a credential")

    @property
    def parsed(self) -> IceUrl:
        return parse_ice_url(self.url)


@dataclass(frozen=True, slots=True)
class IceConfig:
    """What a peer connection gathers with: servers, host allowlist, transport policy.

    ``hosts`` are IP addresses or networks (``127.0.0.1``, ``10.1.0.0/16``);
    empty means every interface address. Raises ValueError if invalid.
    """

    servers: tuple[IceServer, ...] = ()
    hosts: tuple[str, ...] = ()
    policy: IcePolicy = "all"

    def __post_init__(self) -> None:
        if not isinstance(self.servers, tuple) or not all(
            isinstance(s, IceServer) for s in self.servers
        ):
            raise ValueError("ICE servers must be a tuple of IceServer")
        if not isinstance(self.hosts, tuple):
            raise ValueError("ICE hosts must be a tuple of str")
        for host in self.hosts:
            try:
                ipaddress.ip_network(host, strict=False)
            except (TypeError, ValueError):
                raise ValueError(f"bad ICE host address {host!r}: expected an IP or CIDR") from None
        if self.policy not in ICE_POLICIES:
            raise ValueError(f"bad ICE policy {self.policy!r}: expected all or relay")
        # relay without a TURN server here is allowed: the signaling server may
        # hand one out; the peer connection fails visibly if none arrives.


def turn_rest_credential(secret: str, expiry: int, user_id: str) -> tuple[str, str]:
    """coturn's REST credential for ``user_id`` valid until ``expiry`` (Unix seconds).

    Returns ``(username, password)``: ``"EXPIRY:ID"`` and the base64 of
    HMAC-SHA1 keyed with the shared secret (coturn's ``static-auth-secret``)
    over the username, as coturn's ``use-auth-secret`` checks it.
    """
    if ":" in user_id:
        raise ValueError("the TURN user id must not contain ':'")
    username = f"{expiry}:{user_id}"
    digest = hmac.new(secret.encode("utf-8"), username.encode("utf-8"), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")
