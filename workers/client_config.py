"""What a ``tunnelctl connect`` serves: devices, and each device's forwards.

Built from flags (``--device ID --forward NAME=HOST:PORT ...``) or from a client
config file (``connect --config client.toml``, ``examples/client.toml``) by the
CLI; every value is checked here, on construction, so a plan built in code obeys
the same rules. Problems raise ``ValueError`` with one line for the user.

All forwards of one device share one peer session (one DataChannel, a stream
per connection, PROTOCOL.md §2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from protocol.frames import is_valid_service_name
from protocol.ice import DEFAULT_KEEPALIVE, IcePolicy, IceServer
from protocol.signaling import is_valid_id


@dataclass(frozen=True, slots=True)
class Forward:
    """Connections accepted on ``host:port`` go to ``service`` on the device."""

    service: str
    host: str
    port: int

    def __post_init__(self) -> None:
        if not is_valid_service_name(self.service):
            raise ValueError(
                f"bad service name {self.service!r}: letters, digits, '.', '_', '-' (1-64)"
            )
        if not self.host:
            raise ValueError(f"forward {self.service}: empty listen host")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"forward {self.service}: port {self.port} is not in 0-65535")

    @property
    def listen(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class DeviceForwards:
    """One device and the forwards to it (none: a ``--stdio`` stream only)."""

    device: str
    forwards: tuple[Forward, ...] = ()

    def __post_init__(self) -> None:
        if not is_valid_id(self.device):
            raise ValueError(f"bad device id {self.device!r}")

    @property
    def services(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f.service for f in self.forwards))


@dataclass(frozen=True, slots=True)
class ClientPlan:
    """Everything one ``connect`` process serves.

    ``wait``: how long to wait at start-up for an offline device (seconds; ``inf``
    for ever); ``None`` means do not wait: an offline device is an error.
    """

    signal_urls: tuple[str, ...]
    devices: tuple[DeviceForwards, ...]
    ice_servers: tuple[IceServer, ...] = ()
    ice_policy: IcePolicy = "all"
    keepalive: float = DEFAULT_KEEPALIVE
    wait: float | None = None
    token_file: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.signal_urls:
            raise ValueError("no signaling server: give --signal URL (or TUNNEL_SIGNAL)")
        if not self.devices:
            raise ValueError("no device: give --device ID (or TUNNEL_DEVICE)")
        seen: set[str] = set()
        for entry in self.devices:
            if entry.device in seen:
                raise ValueError(f"device {entry.device} is listed twice")
            seen.add(entry.device)
        listens: dict[tuple[str, int], str] = {}
        for entry in self.devices:
            for fwd in entry.forwards:
                key = (fwd.host, fwd.port)
                if fwd.port and key in listens:
                    raise ValueError(
                        f"{fwd.listen} is used by two forwards ({listens[key]} and "
                        f"{entry.device}/{fwd.service})"
                    )
                listens[key] = f"{entry.device}/{fwd.service}"
        if self.wait is not None and (math.isnan(self.wait) or self.wait < 0):
            raise ValueError("--wait must be a number of seconds >= 0")


def parse_listen(text: str, what: str = "--listen") -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``PORT`` (on 127.0.0.1); checked."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "127.0.0.1", text
    if not port_text.isdigit():
        raise ValueError(f"bad {what} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:2222")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"bad {what} {text!r}: port {port} is not in 0-65535")
    return host.strip("[]") or "127.0.0.1", port


def parse_forward(text: str) -> Forward:
    """``NAME=HOST:PORT`` (``--forward``); ``NAME=PORT`` listens on 127.0.0.1."""
    name, sep, listen = text.partition("=")
    if not sep or not name:
        raise ValueError(
            f"bad --forward {text!r}: expected NAME=HOST:PORT, e.g. ssh=127.0.0.1:2222"
        )
    host, port = parse_listen(listen, f"--forward {name}")
    return Forward(name, host, port)


def forwards_of(specs: Sequence[str]) -> tuple[Forward, ...]:
    return tuple(parse_forward(spec) for spec in specs)
