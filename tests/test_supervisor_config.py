"""supervisor.config: the TOML file, the flags, and the errors they raise (with key paths)."""

from __future__ import annotations

import dataclasses
import pickle
import shutil
from pathlib import Path

import pytest

from protocol.ice import IceServer
from supervisor.config import (
    TUNING_KEYS,
    DeviceConfig,
    Service,
    SupervisorConfig,
    config_from_flags,
    load_config,
    parse_service,
)
from supervisor.errors import ConfigError, SupervisorError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "tunnel.toml"

SIGNAL = 'signal = "ws://127.0.0.1:8000/signal"\n'
DEVICE = """
[[devices]]
id = "laptop"
token = "device-token"

[devices.services]
web = "http://127.0.0.1:8080"
"""
MINIMAL = SIGNAL + DEVICE


def write(tmp_path: Path, text: str, name: str = "tunnel.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> SupervisorConfig:
    return load_config(str(write(tmp_path, text)), env or {})


def failure(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, env)
    return info.value


def defaults() -> dict[str, object]:
    """The tuning defaults, the values of the ``[supervisor]`` keys when absent."""
    tuning = {f.name: f.default for f in dataclasses.fields(SupervisorConfig)}
    return {key: tuning[key] for key in TUNING_KEYS}


# --- the error type -----------------------------------------------------------


def test_config_error_is_path_colon_message() -> None:
    exc = ConfigError("devices[1].services.web", "bad service URL")
    assert isinstance(exc, SupervisorError)
    assert (exc.path, exc.message) == ("devices[1].services.web", "bad service URL")
    assert str(exc) == "devices[1].services.web: bad service URL"
    assert str(ConfigError(None, "cannot read x.toml")) == "cannot read x.toml"
    copy = pickle.loads(pickle.dumps(exc))
    assert (type(copy), copy.path, copy.message) == (ConfigError, exc.path, exc.message)


# --- valid files --------------------------------------------------------------


def test_signal_may_list_several_urls_tried_in_order(tmp_path: Path) -> None:
    text = 'signal = ["ws://a.example:8000/signal", "wss://b.example/signal"]\n' + DEVICE
    config = load(tmp_path, text)
    assert config.signal_urls == ("ws://a.example:8000/signal", "wss://b.example/signal")
    assert config.signal_url == "ws://a.example:8000/signal"
    assert load(tmp_path, MINIMAL).signal_urls == ("ws://127.0.0.1:8000/signal",)
    bad = 'signal = ["ws://a.example/signal", "http://b.example/signal"]\n' + DEVICE
    assert failure(tmp_path, bad).path == "signal[1]"
    assert failure(tmp_path, "signal = []\n" + DEVICE).path == "signal"
    assert failure(tmp_path, "signal = [1]\n" + DEVICE).path == "signal[0]"


def test_start_flags_take_several_signal_urls() -> None:
    config = config_from_flags(
        signal_url=("ws://a.example/signal", "ws://b.example/signal"),
        device="laptop",
        token="device-token",
        exposes=["web=http://127.0.0.1:8080"],
    )
    assert config.signal_urls == ("ws://a.example/signal", "ws://b.example/signal")


def test_minimal_file_gets_the_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, MINIMAL)
    assert config.signal_url == "ws://127.0.0.1:8000/signal"
    assert config.devices == (
        DeviceConfig("laptop", "device-token", (Service("web", "127.0.0.1", 8080),)),
    )
    assert (config.ice_servers, config.ice_hosts) == ((), ())
    assert {key: getattr(config, key) for key in defaults()} == defaults()


def test_full_file(tmp_path: Path) -> None:
    text = """
signal = "wss://signal.example.net:8443/signal"
ice_hosts = ["127.0.0.1", "10.0.0.0/8", "::1"]

[[ice_servers]]
url = "stun:127.0.0.1:3478"

[[ice_servers]]
url = "turns:[::1]:5349?transport=tcp"
username = "u"
credential = "p"

[supervisor]
pool_size = 0
heartbeat_interval = 2
heartbeat_timeout = 7.5
max_restarts = 0
restart_window = 30
backoff_base = 1
backoff_cap = 1
drain_timeout = 0
max_sessions = 1024

[[devices]]
id = "laptop"
token = "t1"

[devices.services]
web = "http://localhost"
ssh = "tcp://127.0.0.1:22"
"web.v2" = "https://127.0.0.1"

[[devices]]
id = "nas"
token = "t2"
services = { db = "127.0.0.1:5432", v6 = "tcp://[::1]:9000" }
"""
    config = load(tmp_path, text)
    assert config.signal_url == "wss://signal.example.net:8443/signal"
    assert config.ice_hosts == ("127.0.0.1", "10.0.0.0/8", "::1")
    assert config.ice_servers == (
        IceServer("stun:127.0.0.1:3478"),
        IceServer("turns:[::1]:5349?transport=tcp", "u", "p"),
    )
    assert (config.pool_size, config.max_restarts, config.max_sessions) == (0, 0, 1024)
    assert config.heartbeat_interval == 2.0 and isinstance(config.heartbeat_interval, float)
    assert (config.heartbeat_timeout, config.restart_window) == (7.5, 30.0)
    assert (config.backoff_base, config.backoff_cap, config.drain_timeout) == (1.0, 1.0, 0.0)
    laptop, nas = config.devices
    assert (laptop.id, laptop.token, nas.id, nas.token) == ("laptop", "t1", "nas", "t2")
    assert laptop.services == (  # in file order
        Service("web", "localhost", 80),
        Service("ssh", "127.0.0.1", 22),
        Service("web.v2", "127.0.0.1", 443),
    )
    assert nas.services == (Service("db", "127.0.0.1", 5432), Service("v6", "::1", 9000))


def test_the_example_file_loads_and_shows_the_defaults(tmp_path: Path) -> None:
    # Copied, so that its relative token_file resolves to a file we provide.
    shutil.copy(EXAMPLE, tmp_path / "tunnel.toml")
    (tmp_path / "laptop.jwt").write_text("laptop-token\n")
    env = {"TUNNEL_TOKEN_NAS": "nas-token", "TURN_PASSWORD": "turn-secret"}
    config = load_config(str(tmp_path / "tunnel.toml"), env)
    assert config.signal_url == "wss://signal.example.net/signal"
    assert config.ice_hosts == ()
    assert config.keepalive == 5.0  # the default, as the file says
    assert config.ice_servers == (
        IceServer("stun:stun.example.net:3478"),
        IceServer("turn:turn.example.net:3478?transport=udp", "tunnel", "turn-secret"),
    )
    assert [(d.id, d.token) for d in config.devices] == [
        ("laptop", "laptop-token"),
        ("nas", "nas-token"),
    ]
    assert config.devices[0].services == (
        Service("web", "127.0.0.1", 8080),
        Service("ssh", "127.0.0.1", 22),
    )
    assert config.devices[1].services == (
        Service("files", "127.0.0.1", 443),
        Service("db", "127.0.0.1", 5432),
        Service("metrics", "::1", 9100),
    )
    # The [supervisor] table documents the defaults: it must keep saying the truth.
    assert {key: getattr(config, key) for key in defaults()} == defaults()


def test_the_example_file_in_place_resolves_token_file_next_to_itself() -> None:
    env = {"TUNNEL_TOKEN_NAS": "x", "TURN_PASSWORD": "y"}
    with pytest.raises(ConfigError) as info:
        load_config(str(EXAMPLE), env)
    assert info.value.path == "devices[0].token_file"
    assert f"cannot read {EXAMPLE.parent / 'laptop.jwt'}" in info.value.message


def test_secrets_stay_out_of_repr(tmp_path: Path) -> None:
    text = MINIMAL.replace("device-token", "s3cr3t-device-token") + (
        '[[ice_servers]]\nurl = "turn:127.0.0.1:3478"\nusername = "u"\ncredential = "s3cr3t-turn"\n'
    )
    config = load(tmp_path, text)
    assert config.devices[0].token == "s3cr3t-device-token"
    assert config.ice_servers[0].credential == "s3cr3t-turn"
    assert "s3cr3t" not in repr(config)
    assert "laptop" in repr(config)


# --- tokens -------------------------------------------------------------------


def device_with(token_lines: str) -> str:
    return SIGNAL + DEVICE.replace('token = "device-token"', token_lines)


def test_relative_token_file_is_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    (tmp_path / "secrets").mkdir()
    etc.mkdir()
    (etc / "laptop.jwt").write_text("  from-etc\n")
    (tmp_path / "secrets" / "laptop.jwt").write_text("from-secrets")
    monkeypatch.chdir(tmp_path / "secrets")  # not where relative paths are resolved
    config = load_config(str(write(etc, device_with('token_file = "laptop.jwt"'))), {})
    assert config.devices[0].token == "from-etc"
    text = device_with('token_file = "../secrets/laptop.jwt"')
    assert load_config(str(write(etc, text)), {}).devices[0].token == "from-secrets"
    absolute = device_with(f'token_file = "{etc / "laptop.jwt"}"')
    assert load(tmp_path, absolute).devices[0].token == "from-etc"


def test_token_env(tmp_path: Path) -> None:
    text = device_with('token_env = "TUNNEL_TOKEN_LAPTOP"')
    assert load(tmp_path, text, {"TUNNEL_TOKEN_LAPTOP": "tok\n"}).devices[0].token == "tok"


@pytest.mark.parametrize(
    ("lines", "env", "expected"),
    [
        ("", {}, "devices[0]: no token: give exactly one of token, token_file, token_env"),
        (
            'token = "a"\ntoken_env = "X"',
            {"X": "b"},
            "devices[0]: token and token_env are both given: "
            "give exactly one of token, token_file, token_env",
        ),
        ('token = ""', {}, "devices[0].token: is empty"),
        ('token = "  "', {}, "devices[0].token: is empty"),
        ("token = 42", {}, "devices[0].token: expected a string, got an integer"),
        ('token_env = "NOPE"', {}, "devices[0].token_env: environment variable NOPE is not set"),
        (
            'token_env = "EMPTY"',
            {"EMPTY": " "},
            "devices[0].token_env: environment variable EMPTY is empty",
        ),
        ('token_env = ""', {}, "devices[0].token_env: is empty"),
        ('token_file = ""', {}, "devices[0].token_file: is empty"),
    ],
)
def test_token_source_errors(
    tmp_path: Path, lines: str, env: dict[str, str], expected: str
) -> None:
    assert str(failure(tmp_path, device_with(lines), env)) == expected


def test_unreadable_token_files_are_named_but_never_their_content(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jwt"
    exc = failure(tmp_path, device_with('token_file = "missing.jwt"'))
    assert str(exc) == f"devices[0].token_file: cannot read {missing}: No such file or directory"

    (tmp_path / "adir").mkdir()
    exc = failure(tmp_path, device_with('token_file = "adir"'))
    assert str(exc) == f"devices[0].token_file: cannot read {tmp_path / 'adir'}: Is a directory"

    (tmp_path / "empty.jwt").write_text("\n\n")
    exc = failure(tmp_path, device_with('token_file = "empty.jwt"'))
    assert str(exc) == f"devices[0].token_file: {tmp_path / 'empty.jwt'} is empty"

    (tmp_path / "binary.jwt").write_bytes(b"s3cr3t-token\xff")
    exc = failure(tmp_path, device_with('token_file = "binary.jwt"'))
    assert str(exc) == f"devices[0].token_file: {tmp_path / 'binary.jwt'} is not UTF-8 text"
    assert "s3cr3t" not in str(exc)


def test_a_huge_token_file_is_not_read_whole(tmp_path: Path) -> None:
    exc = failure(tmp_path, device_with('token_file = "/dev/zero"'))
    assert str(exc) == "devices[0].token_file: /dev/zero is larger than 64 KiB"


# --- every other error, with its exact key path --------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # unknown keys, with a hint when one is close
        ("signall = 1\n" + MINIMAL, "signall: unknown key (did you mean 'signal'?)"),
        (
            MINIMAL + "[supervisor]\npool_sise = 3\n",
            "supervisor.pool_sise: unknown key (did you mean 'pool_size'?)",
        ),
        (
            MINIMAL.replace('id = "laptop"', 'id = "laptop"\nport = 1'),
            "devices[0].port: unknown key",
        ),
        (
            MINIMAL + '[[ice_servers]]\nurl = "stun:h"\nuser = "u"\n',
            "ice_servers[0].user: unknown key (did you mean 'username'?)",
        ),
        # wrong types; a boolean is not an integer, a float is not an integer
        ("signal = 1\n" + DEVICE, "signal: expected a string, got an integer"),
        (
            MINIMAL + "[supervisor]\npool_size = true\n",
            "supervisor.pool_size: expected an integer, got a boolean",
        ),
        (
            MINIMAL + "[supervisor]\nmax_sessions = 8.0\n",
            "supervisor.max_sessions: expected an integer, got a float",
        ),
        (
            MINIMAL + "[supervisor]\nheartbeat_interval = false\n",
            "supervisor.heartbeat_interval: expected a number, got a boolean",
        ),
        (
            MINIMAL + '[supervisor]\ndrain_timeout = "10"\n',
            "supervisor.drain_timeout: expected a number, got a string",
        ),
        (
            MINIMAL + "[supervisor]\ndrain_timeout = 1979-05-27T07:32:00Z\n",
            "supervisor.drain_timeout: expected a number, got a date-time",
        ),
        ("supervisor = 3\n" + MINIMAL, "supervisor: expected a table, got an integer"),
        (
            'ice_hosts = "127.0.0.1"\n' + MINIMAL,
            "ice_hosts: expected an array of strings, got a string",
        ),
        ('ice_hosts = ["::1", 1]\n' + MINIMAL, "ice_hosts[1]: expected a string, got an integer"),
        (
            'ice_servers = "stun:h"\n' + MINIMAL,
            "ice_servers: expected an array of tables ([[ice_servers]]), got a string",
        ),
        (
            SIGNAL + 'devices = "laptop"\n',
            "devices: expected an array of tables ([[devices]]), got a string",
        ),
        (SIGNAL + "devices = [1]\n", "devices[0]: expected a table, got an integer"),
        (
            MINIMAL.replace('id = "laptop"', "id = 7"),
            "devices[0].id: expected a string, got an integer",
        ),
        (
            MINIMAL.replace('"http://127.0.0.1:8080"', "8080"),
            "devices[0].services.web: expected a string (the service URL), got an integer",
        ),
        (
            MINIMAL.replace(
                '[devices.services]\nweb = "http://127.0.0.1:8080"', 'services = "web"'
            ),
            "devices[0].services: expected a table, got a string",
        ),
        # required keys
        (DEVICE, "signal: required key is missing"),
        (SIGNAL, "devices: at least one [[devices]] table is required"),
        (SIGNAL + "devices = []\n", "devices: at least one [[devices]] table is required"),
        (MINIMAL.replace('id = "laptop"', ""), "devices[0].id: required key is missing"),
        (
            SIGNAL + '[[devices]]\nid = "laptop"\ntoken = "t"\n',
            "devices[0].services: required key is missing (a device needs a service)",
        ),
        (
            MINIMAL + "[[ice_servers]]\nusername = 'u'\n",
            "ice_servers[0].url: required key is missing",
        ),
        # ids
        (
            MINIMAL.replace('id = "laptop"', 'id = "my laptop"'),
            "devices[0].id: 'my laptop' is not a valid device id "
            "(expected [A-Za-z0-9][A-Za-z0-9._-]{0,63})",
        ),
        (
            MINIMAL + DEVICE.replace("laptop", "nas") + DEVICE,
            "devices[2].id: duplicate device id 'laptop' (also devices[0])",
        ),
        # services
        (
            SIGNAL + '[[devices]]\nid = "laptop"\ntoken = "t"\n[devices.services]\n',
            "devices[0].services: a device needs at least one service",
        ),
        (
            MINIMAL.replace("web =", '"we b" ='),
            "devices[0].services.\"we b\": bad service name 'we b': use 1-64 letters, digits, "
            "'.', '_', '-', starting with a letter or digit",
        ),
        (
            MINIMAL
            + DEVICE.replace("laptop", "nas").replace("http://127.0.0.1:8080", "ftp://h:21"),
            "devices[1].services.web: bad service URL 'ftp://h:21': scheme must be one of "
            "http, https, tcp, ws, wss (or a bare HOST:PORT for tcp)",
        ),
        (
            MINIMAL.replace("web =", '"web.v2" =').replace(":8080", ":8080/admin"),
            "devices[0].services.\"web.v2\": bad service URL 'http://127.0.0.1:8080/admin': "
            "a service is a host and port, no path",
        ),
        # the signal URL
        (
            MINIMAL.replace("ws://127.0.0.1:8000/signal", "http://127.0.0.1:8000/signal"),
            "signal: expected a ws:// or wss:// URL with a host, got 'http://127.0.0.1:8000/signal'",
        ),
        (
            MINIMAL.replace("ws://127.0.0.1:8000/signal", "ws:///signal"),
            "signal: expected a ws:// or wss:// URL with a host, got 'ws:///signal'",
        ),
        (
            MINIMAL.replace("ws://127.0.0.1:8000/signal", "ws://127.0.0.1:99999/signal"),
            "signal: expected a ws:// or wss:// URL with a host, got 'ws://127.0.0.1:99999/signal'",
        ),
        # ICE servers and hosts
        (
            MINIMAL + '[[ice_servers]]\nurl = "http://127.0.0.1:3478"\n',
            "ice_servers[0].url: bad ICE server URL 'http://127.0.0.1:3478': expected "
            "stun:HOST[:PORT], turn:HOST[:PORT][?transport=udp|tcp] or turns:HOST[:PORT]",
        ),
        (
            MINIMAL + '[[ice_servers]]\nurl = "stun:h"\n[[ice_servers]]\nurl = "stun:h:70000"\n',
            "ice_servers[1].url: bad ICE server URL 'stun:h:70000': "
            "port 70000 out of range 1-65535",
        ),
        (
            MINIMAL + '[[ice_servers]]\nurl = "stun:h?transport=sctp"\n',
            "ice_servers[0].url: bad ICE server URL 'stun:h?transport=sctp': expected "
            "stun:HOST[:PORT], turn:HOST[:PORT][?transport=udp|tcp] or turns:HOST[:PORT]",
        ),
        (
            MINIMAL + '[[ice_servers]]\nurl = "stuns:h"\n',
            "ice_servers[0].url: ICE server URL 'stuns:h': stuns: (STUN over TLS) is not "
            "supported; use stun:, or turns: for TLS to a relay",
        ),
        (
            'ice_policy = "direct"\n' + MINIMAL,
            "ice_policy: 'direct' is not one of all, relay",
        ),
        (
            MINIMAL + '[[ice_servers]]\nurl = "turn:127.0.0.1:3478"\nusername = "u"\n',
            "ice_servers[0]: TURN server turn:127.0.0.1:3478 needs a username and a credential",
        ),
        (
            MINIMAL + '[[ice_servers]]\nurl = "turns:h"\ncredential = "p"\n',
            "ice_servers[0]: TURN server turns:h needs a username and a credential",
        ),
        (
            MINIMAL
            + '[[ice_servers]]\nurl = "turn:h"\nusername = "u"\ncredential = "p"\n'
            + 'credential_env = "P"\n',
            "ice_servers[0]: give credential or credential_env, not both",
        ),
        (
            MINIMAL + '[[ice_servers]]\nurl = "turn:h"\nusername = "u"\ncredential_env = "TP"\n',
            "ice_servers[0].credential_env: environment variable TP is not set",
        ),
        (
            'ice_hosts = ["127.0.0.1", "eth0"]\n' + MINIMAL,
            "ice_hosts[1]: 'eth0' is not an IP address or network "
            "(e.g. 127.0.0.1, 10.0.0.0/8, ::1)",
        ),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    assert str(failure(tmp_path, text)) == expected


def test_credentials_in_urls_are_refused_without_echoing_them(tmp_path: Path) -> None:
    cases = [
        (
            MINIMAL.replace("ws://127.0.0.1", "ws://u:s3cr3t@127.0.0.1"),
            "signal: takes no user or password (devices authenticate with a token)",
        ),
        (
            MINIMAL.replace("http://127.0.0.1", "http://u:s3cr3t@127.0.0.1"),
            "devices[0].services.web: bad service URL: a service URL takes no user or password",
        ),
        (
            MINIMAL + '[[ice_servers]]\nurl = "turn:u:s3cr3t@h"\n',
            "ice_servers[0].url: bad ICE server URL: give the username and credential separately",
        ),
    ]
    for text, expected in cases:
        assert str(failure(tmp_path, text)) == expected


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("pool_size = 33", "supervisor.pool_size: must be 0-32, got 33"),
        ("pool_size = -1", "supervisor.pool_size: must be 0-32, got -1"),
        ("heartbeat_interval = 0", "supervisor.heartbeat_interval: must be > 0, got 0.0"),
        (
            "heartbeat_timeout = 1.0",
            "supervisor.heartbeat_timeout: must be greater than heartbeat_interval (1.0), got 1.0",
        ),
        (
            "heartbeat_interval = 6",
            "supervisor.heartbeat_timeout: must be greater than heartbeat_interval (6.0), got 5.0",
        ),
        ("max_restarts = -1", "supervisor.max_restarts: must be >= 0, got -1"),
        ("restart_window = 0", "supervisor.restart_window: must be > 0, got 0.0"),
        ("backoff_base = 0", "supervisor.backoff_base: must be > 0, got 0.0"),
        (
            "backoff_base = 31",
            "supervisor.backoff_base: must not exceed backoff_cap (30.0), got 31.0",
        ),
        (
            "backoff_cap = 0.25",
            "supervisor.backoff_base: must not exceed backoff_cap (0.25), got 0.5",
        ),
        ("drain_timeout = -0.5", "supervisor.drain_timeout: must be >= 0, got -0.5"),
        ("drain_timeout = inf", "supervisor.drain_timeout: must be a finite number"),
        ("restart_window = nan", "supervisor.restart_window: must be a finite number"),
        ("max_sessions = 0", "supervisor.max_sessions: must be 1-1024, got 0"),
        ("max_sessions = 1025", "supervisor.max_sessions: must be 1-1024, got 1025"),
    ],
)
def test_tuning_ranges(tmp_path: Path, setting: str, expected: str) -> None:
    assert str(failure(tmp_path, MINIMAL + f"[supervisor]\n{setting}\n")) == expected


@pytest.mark.parametrize(
    ("setting", "key", "value"),
    [
        ("pool_size = 0", "pool_size", 0),
        ("pool_size = 32", "pool_size", 32),
        ("heartbeat_timeout = 1.01", "heartbeat_timeout", 1.01),
        ("max_restarts = 0", "max_restarts", 0),
        ("backoff_base = 30", "backoff_base", 30.0),
        ("drain_timeout = 0", "drain_timeout", 0.0),
        ("max_sessions = 1", "max_sessions", 1),
        ("max_sessions = 1024", "max_sessions", 1024),
    ],
)
def test_tuning_bounds_are_inclusive_where_documented(
    tmp_path: Path, setting: str, key: str, value: float
) -> None:
    assert getattr(load(tmp_path, MINIMAL + f"[supervisor]\n{setting}\n"), key) == value


# --- the file itself ----------------------------------------------------------


def test_missing_or_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(str(missing), {})
    assert info.value.path is None
    assert str(info.value) == f"cannot read {missing}: No such file or directory"
    with pytest.raises(ConfigError, match=r": Is a directory$"):
        load_config(str(tmp_path), {})


def test_invalid_toml_says_which_line(tmp_path: Path) -> None:
    path = write(tmp_path, SIGNAL + "\n[[devices]]\nid = laptop\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), {})
    assert info.value.path is None
    assert str(info.value) == f"{path} is not valid TOML: Invalid value (at line 4, column 6)"


def test_a_key_given_twice_is_a_toml_error(tmp_path: Path) -> None:
    exc = failure(tmp_path, MINIMAL + 'web = "tcp://127.0.0.1:1"\n')
    assert exc.path is None
    assert "is not valid TOML: Cannot overwrite a value (at line 9, column" in str(exc)


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "tunnel.toml"
    path.write_bytes(SIGNAL.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), {})
    assert str(info.value) == f"{path} is not UTF-8 text (at line 2)"


# --- parse_service --------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "service"),
    [
        ("web=http://127.0.0.1:8080", Service("web", "127.0.0.1", 8080)),
        ("web=http://localhost", Service("web", "localhost", 80)),
        ("web=http://127.0.0.1:8080/", Service("web", "127.0.0.1", 8080)),
        ("secure=https://127.0.0.1", Service("secure", "127.0.0.1", 443)),
        ("sock=ws://127.0.0.1", Service("sock", "127.0.0.1", 80)),
        ("socks=wss://127.0.0.1", Service("socks", "127.0.0.1", 443)),
        ("ssh=tcp://127.0.0.1:22", Service("ssh", "127.0.0.1", 22)),
        ("db=127.0.0.1:5432", Service("db", "127.0.0.1", 5432)),
        ("db=localhost:5432", Service("db", "localhost", 5432)),
        ("v6=tcp://[::1]:9000", Service("v6", "::1", 9000)),
        ("v6=[::1]:9000", Service("v6", "::1", 9000)),
        ("a.b_c-1=tcp://db.internal:1", Service("a.b_c-1", "db.internal", 1)),
        ("web=tcp://127.0.0.1:65535", Service("web", "127.0.0.1", 65535)),
    ],
)
def test_service_specs(spec: str, service: Service) -> None:
    assert parse_service(spec) == service


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("web", "expected NAME=URL (e.g. web=http://127.0.0.1:8080), got 'web'"),
        ("=http://127.0.0.1", "bad service name ''"),
        ("we b=http://127.0.0.1:80", "bad service name 'we b'"),
        ("-web=http://127.0.0.1:80", "bad service name '-web'"),
        ("x" * 65 + "=tcp://h:1", "bad service name"),
        ("web=ftp://127.0.0.1:21", "scheme must be one of http, https, tcp, ws, wss"),
        ("web=127.0.0.1", "scheme must be one of"),
        ("web=", "scheme must be one of"),
        ("web=tcp://127.0.0.1", "needs a host and a port"),
        ("web=http://:80", "needs a host and a port"),
        ("web=http://127.0.0.1:99999", "bad port"),
        ("web=http://127.0.0.1:0", "bad port 0"),
        ("web=http://127.0.0.1:http", "bad port"),
        ("web=http://127.0.0.1:80/admin", "no path"),
        ("web=http://127.0.0.1:80/?q=1", "no path"),
        ("web=http://127.0.0.1:80#top", "no path"),
        ("web=http://[::1:80", "bad host"),
        ("web=tcp://bad host:80", "bad host 'bad host'"),
        ("web=http://u:s3cr3t@127.0.0.1", "bad service URL: a service URL takes no user or"),
    ],
)
def test_bad_service_specs_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_service(spec)
    assert message in str(info.value)


def test_values_check_themselves_on_construction() -> None:
    with pytest.raises(ValueError, match="bad port 0"):
        Service("web", "127.0.0.1", 0)
    with pytest.raises(ValueError, match="expected an integer"):
        Service("web", "127.0.0.1", True)
    with pytest.raises(ValueError, match="bad service name"):
        Service("we b", "127.0.0.1", 80)
    with pytest.raises(ValueError, match="bad service host"):
        Service("web", "", 80)
    with pytest.raises(ValueError, match="bad ICE server URL"):
        IceServer("stun://127.0.0.1")
    with pytest.raises(ValueError, match="needs a username and a credential"):
        IceServer("turn:127.0.0.1", "u", "")
    web = (Service("web", "127.0.0.1", 80),)
    with pytest.raises(ConfigError) as info:
        DeviceConfig("laptop", "t", web + web)
    assert str(info.value) == "services: service 'web' is exposed twice"
    with pytest.raises(ConfigError) as info:
        SupervisorConfig("ws://h/signal", (DeviceConfig("laptop", "t", web),), pool_size=40)
    assert info.value.path == "supervisor.pool_size"
    with pytest.raises(ConfigError) as info:
        SupervisorConfig("ws://h/signal", ())
    assert str(info.value) == "devices: at least one device is required"


# --- flags ----------------------------------------------------------------------


def test_flags_and_file_give_the_same_config(tmp_path: Path) -> None:
    from_flags = config_from_flags(
        signal_url="ws://127.0.0.1:8000/signal",
        device="laptop",
        token="device-token",
        exposes=["web=http://127.0.0.1:8080", "ssh=127.0.0.1:22"],
        ice_servers=[IceServer("turn:127.0.0.1:3478", "u", "p")],
        ice_hosts=["127.0.0.1, ::1", "10.0.0.0/8"],
    )
    text = """
signal = "ws://127.0.0.1:8000/signal"
ice_hosts = ["127.0.0.1", "::1", "10.0.0.0/8"]
[[ice_servers]]
url = "turn:127.0.0.1:3478"
username = "u"
credential = "p"
[[devices]]
id = "laptop"
token = "device-token"
[devices.services]
web = "http://127.0.0.1:8080"
ssh = "127.0.0.1:22"
"""
    assert from_flags == load(tmp_path, text)
    assert {key: getattr(from_flags, key) for key in defaults()} == defaults()


def test_flags_minimal() -> None:
    config = config_from_flags(
        signal_url="wss://signal.example.net/signal",
        device="pi",
        token="t",
        exposes=["ssh=tcp://127.0.0.1:22"],
    )
    assert config.devices == (DeviceConfig("pi", "t", (Service("ssh", "127.0.0.1", 22),)),)
    assert (config.ice_servers, config.ice_hosts) == ((), ())


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"signal_url": "http://h/signal"},
            "--signal: expected a ws:// or wss:// URL with a host, got 'http://h/signal'",
        ),
        (
            {"device": "my laptop"},
            "--device: 'my laptop' is not a valid device id "
            "(expected [A-Za-z0-9][A-Za-z0-9._-]{0,63})",
        ),
        ({"token": ""}, "--token: is empty"),
        ({"exposes": []}, "--expose: a device needs at least one service"),
        (
            {"exposes": ["web"]},
            "--expose: expected NAME=URL (e.g. web=http://127.0.0.1:8080), got 'web'",
        ),
        (
            {"exposes": ["web=tcp://127.0.0.1:1", "web=tcp://127.0.0.1:2"]},
            "--expose: service 'web' is exposed twice",
        ),
        (
            {"ice_hosts": ["127.0.0.1,eth0"]},
            "--ice-host: 'eth0' is not an IP address or network (e.g. 127.0.0.1, 10.0.0.0/8, ::1)",
        ),
    ],
)
def test_flag_errors_name_the_flag(changes: dict[str, object], expected: str) -> None:
    flags: dict[str, object] = {
        "signal_url": "ws://127.0.0.1:8000/signal",
        "device": "laptop",
        "token": "t",
        "exposes": ["web=http://127.0.0.1:8080"],
    }
    with pytest.raises(ConfigError) as info:
        config_from_flags(**(flags | changes))  # type: ignore[arg-type]
    assert str(info.value) == expected


def test_keepalive_is_a_top_level_key_in_seconds(tmp_path: Path) -> None:
    assert load(tmp_path, MINIMAL).keepalive == 5.0
    assert load(tmp_path, SIGNAL + "keepalive = 2.5\n" + DEVICE).keepalive == 2.5
    assert load(tmp_path, SIGNAL + "keepalive = 3\n" + DEVICE).keepalive == 3.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.5", "keepalive: keepalive must be 1-300 seconds, got 0.5"),
        ("301", "keepalive: keepalive must be 1-300 seconds, got 301"),
        ("nan", "keepalive: keepalive must be 1-300 seconds, got nan"),
        ('"5"', "keepalive: expected a number, got a string"),
    ],
)
def test_keepalive_errors_name_the_key(tmp_path: Path, value: str, expected: str) -> None:
    assert str(failure(tmp_path, SIGNAL + f"keepalive = {value}\n" + DEVICE)) == expected
