"""The client config file: ``tunnelctl connect --config client.toml``.

TOML 1.0 (:mod:`tomllib`), documented key by key in ``examples/client.toml``;
read with the supervisor's key-path checks, so a mistake is reported as
``devices[1].forwards.ssh: ...`` exactly as ``start --config`` reports its own.
The result is a :class:`workers.client_config.ClientPlan` and the token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from protocol.ice import DEFAULT_KEEPALIVE, IceServer, check_keepalive
from supervisor.config import read_token, read_toml
from supervisor.errors import ConfigError
from supervisor.toml_keys import (
    check_keys,
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
from workers.client_config import ClientPlan, DeviceForwards, Forward, parse_listen

_TOP_KEYS: Final = (
    "signal",
    "token",
    "token_file",
    "token_env",
    "ice_hosts",
    "ice_policy",
    "keepalive",
    "devices",
)
_DEVICE_KEYS: Final = ("id", "forwards")


@dataclass(frozen=True)
class ClientFile:
    plan: ClientPlan
    token: str
    token_file: Path | None
    ice_hosts: tuple[str, ...]


def load_client_config(
    path: str, env: Mapping[str, str], *, ice_servers: tuple[IceServer, ...] = ()
) -> ClientFile:
    """Read and check ``path``; raise :class:`ConfigError` naming the key at fault."""
    data = read_toml(path)
    here = Path(path).absolute().parent
    check_keys(data, None, _TOP_KEYS)
    signal = data.get("signal")
    if isinstance(signal, str):
        signal_urls: tuple[str, ...] = (signal,)
    elif isinstance(signal, list):
        signal_urls = get_strings(data, None, "signal")
    elif signal is None:
        raise ConfigError("signal", "required key is missing")
    else:
        raise wrong_type("signal", "a URL or an array of URLs", signal)
    if not signal_urls:
        raise ConfigError("signal", "needs at least one signaling URL")
    for index, url in enumerate(signal_urls):
        if not url.startswith(("ws://", "wss://")):
            raise ConfigError(f"signal[{index}]", f"{url!r} is not a ws:// or wss:// URL")
    token = read_token(data, "", env, here)
    file = data.get("token_file")
    policy = get_string(data, None, "ice_policy") or "all"
    if policy not in ("all", "relay"):
        raise ConfigError("ice_policy", f"must be 'all' or 'relay', not {policy!r}")
    keepalive = get_number(data, "", "keepalive") if "keepalive" in data else DEFAULT_KEEPALIVE
    with under("keepalive"):
        check_keepalive(keepalive)
    tables = get_tables(data, None, "devices")
    if not tables:
        raise ConfigError("devices", "at least one [[devices]] table is required")
    devices = tuple(_device(table, at) for at, table in tables)
    with under("devices"):  # what the plan checks across devices: a listen address twice
        plan = ClientPlan(
            signal_urls=signal_urls,
            devices=devices,
            ice_servers=ice_servers,
            ice_policy="relay" if policy == "relay" else "all",
            keepalive=keepalive,
        )
    return ClientFile(
        plan,
        token,
        here / file if isinstance(file, str) else None,
        get_strings(data, None, "ice_hosts"),
    )


def _device(table: Mapping[str, object], at: str) -> DeviceForwards:
    check_keys(table, at, _DEVICE_KEYS)
    device = get_required_string(table, at, "id")
    forwards_at = join_key(at, "forwards")
    forwards = []
    for name, listen in (get_table(table, at, "forwards") or {}).items():
        forward_at = join_key(forwards_at, name)
        if not isinstance(listen, str):
            raise wrong_type(forward_at, "a string (the local HOST:PORT)", listen)
        with under(forward_at):
            forwards.append(Forward(name, *parse_listen(listen, "listen address")))
    with under(at):
        return DeviceForwards(device, tuple(forwards))
