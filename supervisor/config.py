"""The supervisor's configuration: a TOML file for many devices, or flags for one.

:func:`load_config` (``tunnelctl start --config FILE``) and
:func:`config_from_flags` (``tunnelctl start --signal URL --device ID --expose
NAME=URL ...``) produce the same frozen :class:`SupervisorConfig`. The file format
(TOML 1.0, read with :mod:`tomllib`) is documented key by key in
``examples/tunnel.toml``.

Contract: everything is checked before the supervisor starts anything. Every
problem raises :class:`~supervisor.errors.ConfigError`, whose ``path`` names the
key (``devices[1].services.web``; array indexes count from 0) or the flag
(``--expose``); the first problem found is the one reported. The dataclasses
check themselves on construction too, so a configuration built in code obeys the
same rules: :class:`Service` and :class:`~protocol.ice.IceServer` raise ``ValueError``
(they are single values; whoever builds them knows where they came from),
:class:`DeviceConfig` and :class:`SupervisorConfig` raise ``ConfigError`` naming
the field. Tokens and TURN credentials never appear in a ``repr`` or a message.

Service URLs are those of :mod:`supervisor.services`. ICE server URLs are
those of RFC 7064 (STUN) and RFC 7065 (TURN) that our ICE stack can honour
(:mod:`protocol.ice`): ``stun:HOST[:PORT]``,
``turn:HOST[:PORT][?transport=udp|tcp]``, ``turns:HOST[:PORT]``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import re
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from aio.metrics_http import parse_listen_address
from protocol.ice import (
    DEFAULT_KEEPALIVE,
    ICE_POLICIES,
    IcePolicy,
    IceServer,
    check_keepalive,
    parse_ice_url,
)
from protocol.signaling import ID_PATTERN, MAX_SERVICES, is_valid_id
from supervisor.errors import ConfigError
from supervisor.services import (
    SERVICE_SCHEMES,
    Service,
    is_valid_host,
    parse_service,
    service_from_url,
)
from supervisor.toml_keys import (
    check_keys,
    get_integer,
    get_number,
    get_required_string,
    get_string,
    get_strings,
    get_table,
    get_tables,
    join_key,
    under,
    wrong_type,
)

__all__ = [
    "MAX_POOL_SIZE",
    "MAX_SESSIONS_PER_DEVICE",
    "SERVICE_SCHEMES",
    "TUNING_KEYS",
    "DeviceConfig",
    "Service",
    "SupervisorConfig",
    "config_from_flags",
    "load_config",
    "parse_service",
    "read_token",
    "read_toml",
]

MAX_POOL_SIZE: Final = 32
MAX_SESSIONS_PER_DEVICE: Final = 1024
MAX_WORKERS: Final = 4096
#: The keys of the ``[supervisor]`` table, each a :class:`SupervisorConfig` field.
TUNING_KEYS: Final = (
    "pool_size",
    "heartbeat_interval",
    "heartbeat_timeout",
    "max_restarts",
    "restart_window",
    "backoff_base",
    "backoff_cap",
    "drain_timeout",
    "max_sessions",
    "max_negotiating_per_client",
    "negotiation_timeout",
    "max_workers",
)
_INTEGER_TUNING: Final = frozenset(
    {"pool_size", "max_restarts", "max_sessions", "max_negotiating_per_client", "max_workers"}
)
_TOP_KEYS: Final = (
    "signal",
    "ice_hosts",
    "ice_servers",
    "ice_policy",
    "keepalive",
    "supervisor",
    "devices",
    "metrics",
)
_TOKEN_SOURCES: Final = ("token", "token_file", "token_env")
_DEVICE_KEYS: Final = ("id", *_TOKEN_SOURCES, "services")
_ICE_SERVER_KEYS: Final = ("url", "username", "credential", "credential_env")

# Both bounds keep a mistaken path (/dev/zero, a log file) from eating memory.
_MAX_CONFIG_BYTES: Final = 1 << 20
_MAX_TOKEN_BYTES: Final = 64 << 10


# --- the configuration --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """One hosted device: its id (the token's ``sub``), its token, its services."""

    id: str
    token: str = field(repr=False)
    services: tuple[Service, ...]
    #: Where ``token`` came from, re-read when the link reconnects (a refreshed token).
    token_file: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not is_valid_id(self.id):
            raise ConfigError("id", f"{self.id!r} is not a valid device id (expected {ID_PATTERN})")
        if not self.token.strip():
            raise ConfigError("token", "is empty")
        if not self.services:
            raise ConfigError("services", "a device needs at least one service")
        if len(self.services) > MAX_SERVICES:
            # Its registration announces them all (PROTOCOL.md §1.3).
            raise ConfigError("services", f"a device exposes at most {MAX_SERVICES} services")
        names: set[str] = set()
        for service in self.services:
            if service.name in names:
                raise ConfigError("services", f"service {service.name!r} is exposed twice")
            names.add(service.name)


@dataclass(frozen=True, slots=True)
class SupervisorConfig:
    """Everything ``tunnelctl start`` needs; the tuning fields are ``[supervisor]`` keys.

    ``pool_size`` idle workers are kept spawned so that a session request never
    waits for an interpreter; ``heartbeat_*``, ``max_restarts`` within
    ``restart_window`` and ``backoff_*`` drive liveness and the restart policy
    (ARCHITECTURE.md, "Process model rules"); ``drain_timeout`` bounds a graceful
    stop; ``max_sessions`` is per device. Admission (README, "Admission"): at
    most ``max_negotiating_per_client`` sessions of one client may be
    negotiating with a device at once; a negotiation not done within
    ``negotiation_timeout`` is given up; at most ``max_workers`` worker processes
    (idle and busy) live at once. ``keepalive`` (a top-level key) is how long a
    session's path may go unanswered before it counts as dead. Times are in
    seconds. ``signal_fallbacks`` are more signaling URLs (nodes of one
    cluster, PROTOCOL.md §1.8), tried after ``signal_url`` in order.
    """

    signal_url: str
    devices: tuple[DeviceConfig, ...]
    signal_fallbacks: tuple[str, ...] = ()
    ice_servers: tuple[IceServer, ...] = ()
    ice_hosts: tuple[str, ...] = ()
    keepalive: float = DEFAULT_KEEPALIVE
    ice_policy: IcePolicy = "all"
    pool_size: int = 2
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 5.0
    max_restarts: int = 5
    restart_window: float = 60.0
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    drain_timeout: float = 10.0
    max_sessions: int = 64
    max_negotiating_per_client: int = 8
    negotiation_timeout: float = 10.0
    max_workers: int = 80
    #: Where Prometheus metrics are served, (host, port); ``None``: not at all.
    metrics: tuple[str, int] | None = None

    @property
    def signal_urls(self) -> tuple[str, ...]:
        """Every signaling URL, in the order they are tried."""
        return (self.signal_url, *self.signal_fallbacks)

    def __post_init__(self) -> None:
        for index, url in enumerate(self.signal_urls):
            _check_signal_url(url, f"signal[{index}]" if self.signal_fallbacks else "signal")
        if not self.devices:
            raise ConfigError("devices", "at least one device is required")
        first_seen: dict[str, int] = {}
        for index, device in enumerate(self.devices):
            if device.id in first_seen:
                raise ConfigError(
                    f"devices[{index}].id",
                    f"duplicate device id {device.id!r} (also devices[{first_seen[device.id]}])",
                )
            first_seen[device.id] = index
        for index, network in enumerate(self.ice_hosts):
            _check_network(network, f"ice_hosts[{index}]")
        try:
            check_keepalive(self.keepalive)
        except ValueError as exc:
            raise ConfigError("keepalive", str(exc)) from None
        if self.ice_policy not in ICE_POLICIES:
            raise ConfigError(
                "ice_policy", f"{self.ice_policy!r} is not one of {', '.join(ICE_POLICIES)}"
            )
        self._check_tuning()

    def _check_tuning(self) -> None:
        def invalid(key: str, problem: str) -> ConfigError:
            return ConfigError(f"supervisor.{key}", problem)

        for key in TUNING_KEYS:
            if not math.isfinite(getattr(self, key)):
                raise invalid(key, "must be a finite number")
        if not 0 <= self.pool_size <= MAX_POOL_SIZE:
            raise invalid("pool_size", f"must be 0-{MAX_POOL_SIZE}, got {self.pool_size}")
        if self.heartbeat_interval <= 0:
            raise invalid("heartbeat_interval", f"must be > 0, got {self.heartbeat_interval}")
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise invalid(
                "heartbeat_timeout",
                f"must be greater than heartbeat_interval ({self.heartbeat_interval}), "
                f"got {self.heartbeat_timeout}",
            )
        if self.max_restarts < 0:
            raise invalid("max_restarts", f"must be >= 0, got {self.max_restarts}")
        if self.restart_window <= 0:
            raise invalid("restart_window", f"must be > 0, got {self.restart_window}")
        if self.backoff_base <= 0:
            raise invalid("backoff_base", f"must be > 0, got {self.backoff_base}")
        if self.backoff_base > self.backoff_cap:
            raise invalid(
                "backoff_base",
                f"must not exceed backoff_cap ({self.backoff_cap}), got {self.backoff_base}",
            )
        if self.drain_timeout < 0:
            raise invalid("drain_timeout", f"must be >= 0, got {self.drain_timeout}")
        if not 1 <= self.max_sessions <= MAX_SESSIONS_PER_DEVICE:
            raise invalid(
                "max_sessions", f"must be 1-{MAX_SESSIONS_PER_DEVICE}, got {self.max_sessions}"
            )
        if not 1 <= self.max_negotiating_per_client <= MAX_SESSIONS_PER_DEVICE:
            raise invalid(
                "max_negotiating_per_client",
                f"must be 1-{MAX_SESSIONS_PER_DEVICE}, got {self.max_negotiating_per_client}",
            )
        if self.negotiation_timeout <= 0:
            raise invalid("negotiation_timeout", f"must be > 0, got {self.negotiation_timeout}")
        # One more than the pool: a session can always get a worker of its own.
        if not self.pool_size + 1 <= self.max_workers <= MAX_WORKERS:
            raise invalid(
                "max_workers",
                f"must be pool_size + 1 ({self.pool_size + 1})-{MAX_WORKERS}, "
                f"got {self.max_workers}",
            )


# --- the other values ---------------------------------------------------------


def _check_signal_url(url: str, path: str) -> None:
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a bad port
    except ValueError:
        parts = None
    if parts is not None and "@" in parts.netloc:  # not echoed: it may hold a password
        raise ConfigError(path, "takes no user or password (devices authenticate with a token)")
    if (
        parts is None
        or parts.scheme not in ("ws", "wss")
        or not is_valid_host(parts.hostname)
        or parts.fragment
    ):
        raise ConfigError(path, f"expected a ws:// or wss:// URL with a host, got {url!r}")


def _signal_urls(data: Mapping[str, object]) -> tuple[str, ...]:
    """``signal``: one URL, or an array of them (tried in order)."""
    if isinstance(data.get("signal"), list):
        urls = get_strings(data, None, "signal")
        if not urls:
            raise ConfigError("signal", "give at least one signaling URL")
        return urls
    return (get_required_string(data, None, "signal"),)


def _check_network(spec: str, path: str) -> None:
    try:
        ipaddress.ip_network(spec, strict=False)
    except (TypeError, ValueError):
        raise ConfigError(
            path, f"{spec!r} is not an IP address or network (e.g. 127.0.0.1, 10.0.0.0/8, ::1)"
        ) from None


# --- the TOML file ------------------------------------------------------------


def load_config(path: str, env: Mapping[str, str]) -> SupervisorConfig:
    """Read and check the TOML configuration file at ``path``.

    ``env`` (normally ``os.environ``) supplies the variables named by
    ``token_env`` and ``credential_env``. A relative ``token_file`` is relative
    to the directory of ``path``. Raises :class:`ConfigError`.
    """
    data = read_toml(path)
    here = Path(path).absolute().parent
    check_keys(data, None, _TOP_KEYS)
    signal_urls = _signal_urls(data)
    ice_hosts = get_strings(data, None, "ice_hosts")
    ice_policy = get_string(data, None, "ice_policy") or "all"
    ice_servers = tuple(
        _ice_server(table, at, env) for at, table in get_tables(data, None, "ice_servers")
    )
    keepalive = get_number(data, "", "keepalive") if "keepalive" in data else DEFAULT_KEEPALIVE
    tuning = _tuning(data)
    metrics = None
    if (spec := get_string(data, None, "metrics")) is not None:
        with under("metrics"):
            metrics = parse_listen_address(spec)
    device_tables = get_tables(data, None, "devices")
    if not device_tables:
        raise ConfigError("devices", "at least one [[devices]] table is required")
    devices = tuple(_device(table, at, env, here) for at, table in device_tables)
    return SupervisorConfig(
        signal_url=signal_urls[0],
        signal_fallbacks=signal_urls[1:],
        devices=devices,
        ice_servers=ice_servers,
        ice_hosts=ice_hosts,
        keepalive=keepalive,
        ice_policy=ice_policy,  # type: ignore[arg-type]  # checked by SupervisorConfig
        metrics=metrics,
        **tuning,
    )


def read_toml(path: str) -> dict[str, Any]:
    """The TOML file at ``path`` as a dict; :class:`ConfigError` if unreadable or invalid."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(_MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(None, f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > _MAX_CONFIG_BYTES:
        raise ConfigError(None, f"{path} is larger than {_MAX_CONFIG_BYTES >> 20} MiB")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(None, f"{path} is not UTF-8 text (at line {line})") from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib says where: "Invalid value (at line 3, column 7)".
        raise ConfigError(None, f"{path} is not valid TOML: {exc}") from None


def _tuning(data: Mapping[str, object]) -> dict[str, Any]:
    table = get_table(data, None, "supervisor")
    if table is None:
        return {}
    check_keys(table, "supervisor", TUNING_KEYS)
    values: dict[str, Any] = {}
    for key in table:
        if key in _INTEGER_TUNING:
            values[key] = get_integer(table, "supervisor", key)
        else:
            values[key] = get_number(table, "supervisor", key)
    return values


def _ice_server(table: Mapping[str, object], at: str, env: Mapping[str, str]) -> IceServer:
    check_keys(table, at, _ICE_SERVER_KEYS)
    url = get_required_string(table, at, "url")
    with under(join_key(at, "url")):
        parse_ice_url(url)
    username = get_string(table, at, "username")
    credential = get_string(table, at, "credential")
    credential_env = get_string(table, at, "credential_env")
    if credential is not None and credential_env is not None:
        raise ConfigError(at, "give credential or credential_env, not both")
    if credential_env is not None:
        credential = _from_env(env, credential_env, join_key(at, "credential_env"))
    with under(at):
        server = IceServer(url, username, credential)
    return server


def _device(
    table: Mapping[str, object], at: str, env: Mapping[str, str], here: Path
) -> DeviceConfig:
    check_keys(table, at, _DEVICE_KEYS)
    device_id = get_required_string(table, at, "id")
    services_at = join_key(at, "services")
    services_table = get_table(table, at, "services")
    if services_table is None:
        raise ConfigError(services_at, "required key is missing (a device needs a service)")
    services = []
    for name, url in services_table.items():
        service_at = join_key(services_at, name)
        if not isinstance(url, str):
            raise wrong_type(service_at, "a string (the service URL)", url)
        with under(service_at):
            services.append(service_from_url(name, url))
    token = read_token(table, at, env, here)
    file = table.get("token_file")
    with under(at):
        device = DeviceConfig(
            device_id, token, tuple(services), here / file if isinstance(file, str) else None
        )
    return device


def read_token(table: Mapping[str, object], at: str, env: Mapping[str, str], here: Path) -> str:
    """The token given by exactly one of the table's token keys (files relative to ``here``)."""
    given = [key for key in _TOKEN_SOURCES if key in table]
    if len(given) != 1:
        problem = "no token" if not given else f"{' and '.join(given)} are both given"
        raise ConfigError(at, f"{problem}: give exactly one of token, token_file, token_env")
    source = given[0]
    source_at = join_key(at, source)
    value = get_required_string(table, at, source)
    if not value.strip():
        raise ConfigError(source_at, "is empty")
    if source == "token_file":
        return _read_token_file(here / value, source_at)
    if source == "token_env":
        return _from_env(env, value, source_at).strip()
    return value.strip()


def _read_token_file(file: Path, path: str) -> str:
    # Messages name the file, never its content.
    try:
        with file.open("rb") as fh:
            raw = fh.read(_MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise ConfigError(path, f"cannot read {file}: {exc.strerror or exc}") from None
    if len(raw) > _MAX_TOKEN_BYTES:
        raise ConfigError(path, f"{file} is larger than {_MAX_TOKEN_BYTES >> 10} KiB")
    try:
        token = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(path, f"{file} is not UTF-8 text") from None
    if not token:
        raise ConfigError(path, f"{file} is empty")
    return token


def _from_env(env: Mapping[str, str], name: str, path: str) -> str:
    if not name:
        raise ConfigError(path, "is empty")
    value = env.get(name)
    if value is None:
        raise ConfigError(path, f"environment variable {name} is not set")
    if not value.strip():
        raise ConfigError(path, f"environment variable {name} is empty")
    return value


# --- command-line flags -------------------------------------------------------


def config_from_flags(
    *,
    signal_url: str | Sequence[str],
    device: str,
    token: str,
    exposes: Sequence[str],
    token_file: str | None = None,
    ice_servers: Sequence[IceServer] = (),
    ice_hosts: Sequence[str] = (),
    ice_policy: IcePolicy = "all",
) -> SupervisorConfig:
    """The one-device configuration of ``tunnelctl start --signal URL --device ID ...``.

    ``exposes`` are ``NAME=URL`` specs (:func:`parse_service`); an ``ice_hosts``
    item may be a comma-separated list, as ``TUNNEL_ICE_HOSTS`` is. Tuning keeps
    its defaults. Raises :class:`ConfigError` whose ``path`` is the flag
    (``--signal``, ``--device``, ``--token``, ``--expose``, ``--ice-host``).
    """
    services = []
    for spec in exposes:
        with under("--expose"):
            services.append(parse_service(spec))
    networks = tuple(h.strip() for spec in ice_hosts for h in spec.split(",") if h.strip())
    with _as_flags({"id": "--device", "token": "--token", "services": "--expose"}):
        device_config = DeviceConfig(
            device, token, tuple(services), Path(token_file) if token_file else None
        )
    with _as_flags({"signal": "--signal", "ice_hosts": "--ice-host", "ice_policy": "--ice-policy"}):
        urls = (signal_url,) if isinstance(signal_url, str) else tuple(signal_url)
        config = SupervisorConfig(
            signal_url=urls[0],
            signal_fallbacks=urls[1:],
            devices=(device_config,),
            ice_servers=tuple(ice_servers),
            ice_hosts=networks,
            ice_policy=ice_policy,
        )
    return config


@contextlib.contextmanager
def _as_flags(flags: Mapping[str, str]) -> Iterator[None]:
    """Name the flag, not the TOML key, in errors about values that came from flags."""
    try:
        yield
    except ConfigError as exc:
        key = re.split(r"[.\[]", exc.path or "", maxsplit=1)[0]
        raise ConfigError(flags.get(key, exc.path), exc.message) from None
