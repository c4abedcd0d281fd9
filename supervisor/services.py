"""The services a device exposes: a name and one TCP endpoint, parsed from a URL.

Service URLs (``--expose NAME=URL``; ``NAME = "URL"`` in the config file) name
one TCP endpoint: ``http://HOST[:PORT]`` (port 80 by default), ``https://``
(443), ``ws://`` (80), ``wss://`` (443), ``tcp://HOST:PORT``, or a bare
``HOST:PORT``; IPv6 hosts go in brackets. A path, query, fragment or user info
is refused: the device forwards a byte stream to that address and knows
nothing of HTTP. Errors are ``ValueError`` with one line saying what is wrong
(never echoing user info, which may hold a password).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from protocol.frames import MAX_SERVICE_LEN, is_valid_service_name

__all__ = ["SERVICE_SCHEMES", "Service", "is_valid_host", "parse_service", "service_from_url"]

#: Service URL schemes and their default ports (``None``: the URL must give one).
SERVICE_SCHEMES: Final[Mapping[str, int | None]] = {
    "http": 80,
    "https": 443,
    "tcp": None,
    "ws": 80,
    "wss": 443,
}
_LABEL: Final = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME_RE: Final = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}\.?")
# "localhost:5432" would otherwise parse as scheme "localhost".
_BARE_HOST_PORT_RE: Final = re.compile(r"(?:[^:/@\[\]]+|\[[0-9A-Fa-f:.]+\]):\d+")


@dataclass(frozen=True, slots=True)
class Service:
    """A service a device exposes: clients reach ``host:port`` by ``name``, nothing else."""

    name: str
    host: str
    port: int

    def __post_init__(self) -> None:
        _check_service_name(self.name)
        if not is_valid_host(self.host):
            raise ValueError(f"bad service host {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise ValueError(f"bad service port {self.port!r}: expected an integer")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"bad port {self.port}: expected 1-65535")


def parse_service(spec: str) -> Service:
    """Parse ``NAME=URL`` (``web=http://127.0.0.1:8080``, ``db=127.0.0.1:5432``).

    Raises ``ValueError`` saying what is wrong.
    """
    name, sep, url = spec.partition("=")
    if not sep:
        raise ValueError(f"expected NAME=URL (e.g. web=http://127.0.0.1:8080), got {spec!r}")
    return service_from_url(name, url)


def service_from_url(name: str, url: str) -> Service:
    """The service ``name`` at ``url``; ``ValueError`` if either is bad."""
    _check_service_name(name)
    if _BARE_HOST_PORT_RE.fullmatch(url):
        url = "tcp://" + url
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed "[" of an IPv6 host
        raise ValueError(f"bad service URL {url!r}: bad host") from None
    if "@" in parts.netloc:  # not echoed: it may hold a password
        raise ValueError("bad service URL: a service URL takes no user or password")
    if parts.scheme not in SERVICE_SCHEMES:
        raise ValueError(
            f"bad service URL {url!r}: scheme must be one of "
            f"{', '.join(SERVICE_SCHEMES)} (or a bare HOST:PORT for tcp)"
        )
    try:
        explicit_port = parts.port
    except ValueError:
        raise ValueError(f"bad service URL {url!r}: bad port") from None
    port = SERVICE_SCHEMES[parts.scheme] if explicit_port is None else explicit_port
    if not parts.hostname or port is None:
        raise ValueError(f"bad service URL {url!r}: needs a host and a port")
    if not 1 <= port <= 65535:
        raise ValueError(f"bad service URL {url!r}: bad port {port}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"bad service URL {url!r}: a service is a host and port, no path")
    if not is_valid_host(parts.hostname):
        raise ValueError(f"bad service URL {url!r}: bad host {parts.hostname!r}")
    return Service(name, parts.hostname, port)


def _check_service_name(name: str) -> None:
    if not is_valid_service_name(name):
        raise ValueError(
            f"bad service name {name!r}: use 1-{MAX_SERVICE_LEN} letters, digits, "
            "'.', '_', '-', starting with a letter or digit"
        )


def is_valid_host(host: object) -> bool:
    """An IP address or a DNS host name (RFC 1123 labels)."""
    if not isinstance(host, str):
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return len(host) <= 253 and _HOSTNAME_RE.fullmatch(host) is not None
    return True
