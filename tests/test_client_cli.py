"""``connect``/``devices``/``status --client`` usage: one-line errors (exit 2) before
anything is contacted; the client config file's checks."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from signaling.auth import issue_token
from tunnelctl.cli import cli

SECRET = "s" * 64
CLIENT = issue_token(SECRET, sub="c", role="client", devices=("d",), ttl=600)
DEVICE = issue_token(SECRET, sub="d", role="device", devices=(), ttl=600)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def dead_signal() -> str:
    with socket.socket() as sock:  # free a moment ago: nothing listens
        sock.bind(("127.0.0.1", 0))
        return f"ws://127.0.0.1:{sock.getsockname()[1]}/signal"


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("tunnelctl: error: "), output
    return lines[0]


BASE = ["connect", "--signal", "ws://127.0.0.1:9/signal", "--device", "d"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([*BASE, "--service", "a", "--service", "b"], "--service given more than once"),
        ([*BASE, "--forward", "web=127.0.0.1:99999"], "port 99999 is not in 0-65535"),
        ([*BASE, "--forward", "web"], "expected NAME=HOST:PORT"),
        ([*BASE, "--forward", "bad name=1"], "bad service name"),
        ([*BASE, "--service", "web", "--listen", "127.0.0.1:65536"], "not in 0-65535"),
        ([*BASE, "--listen", "127.0.0.1:80"], "--listen goes with --service"),
        ([*BASE], "nothing to forward"),
        ([*BASE, "--service", "ssh", "--stdio", "--forward", "a=1"], "--stdio carries one"),
        ([*BASE, "--forward", "a=127.0.0.1:7", "--forward", "b=127.0.0.1:7"], "two forwards"),
        (["connect", "--signal", "ws://x/s", "--forward", "a=1"], "missing --device"),
        (["connect", "--device"], "requires an argument"),
        (["connect", "--bogus"], "No such option"),
        (["devices"], "Missing option '--signal'"),
        (["nosuchverb"], "No such command"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    runner: CliRunner, args: list[str], message: str
) -> None:
    result = runner.invoke(cli, args, env={"TUNNEL_TOKEN": CLIENT})
    assert result.exit_code == 2, result.output
    assert message in one_error_line(result.output)


def test_a_device_token_is_named_as_such(runner: CliRunner) -> None:
    result = runner.invoke(cli, [*BASE, "--forward", "a=0"], env={"TUNNEL_TOKEN": DEVICE})
    assert result.exit_code == 2
    line = one_error_line(result.output)
    assert "device token" in line and "client token" in line
    assert "session_request" not in line


def test_environment_defaults_for_signal_and_device(runner: CliRunner) -> None:
    url = dead_signal()
    result = runner.invoke(
        cli,
        ["connect", "--forward", "web=127.0.0.1:0"],
        env={"TUNNEL_TOKEN": CLIENT, "TUNNEL_SIGNAL": url, "TUNNEL_DEVICE": "d"},
    )
    assert result.exit_code == 1, result.output
    assert f"cannot reach the signaling server at {url}" in one_error_line(result.output)


def test_status_of_clients_when_none_runs_exits_3(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli, ["status", "--client", "--runtime-dir", str(tmp_path)])
    assert result.exit_code == 3
    assert "no tunnelctl connect running" in one_error_line(result.output)


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "client.jwt").write_text(CLIENT + "\n")
    path = tmp_path / "client.toml"
    path.write_text(text)
    return path


GOOD = """\
signal = ["ws://127.0.0.1:9/signal", "ws://127.0.0.2:9/signal"]
token_file = "client.jwt"
[[devices]]
id = "d"
forwards = { ssh = "127.0.0.1:2222", web = "8080" }
"""


def test_the_client_config_is_read(tmp_path: Path) -> None:
    from tunnelctl.client_config import load_client_config
    from workers.client_config import Forward

    loaded = load_client_config(str(write(tmp_path, GOOD)), {})
    assert loaded.token == CLIENT
    assert loaded.token_file == tmp_path / "client.jwt"
    assert loaded.plan.signal_urls == ("ws://127.0.0.1:9/signal", "ws://127.0.0.2:9/signal")
    (device,) = loaded.plan.devices
    assert device.forwards == (
        Forward("ssh", "127.0.0.1", 2222),
        Forward("web", "127.0.0.1", 8080),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD.replace("token_file", "tokenfile"), "tokenfile: unknown key"),
        (GOOD.replace('"127.0.0.1:2222"', '"127.0.0.1:70000"'), "devices[0].forwards.ssh"),
        (GOOD.replace('"8080"', '"127.0.0.1:2222"'), "used by two forwards"),
        (GOOD + '[[devices]]\nid = "d"\n', "device d is listed twice"),
        (GOOD.replace('signal = ["ws', 'signal = ["http'), "not a ws:// or wss:// URL"),
        ("signal = 'ws://x/s'\ntoken_file = 'client.jwt'\n", "at least one [[devices]]"),
        (GOOD.replace("[[devices]]", "keepalive = 0\n[[devices]]"), "keepalive"),
    ],
)
def test_config_mistakes_name_the_key(
    runner: CliRunner, tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, text)
    result = runner.invoke(cli, ["connect", "--config", str(path)], env={})
    assert result.exit_code == 2, result.output
    assert message in one_error_line(result.output)


def test_config_and_flags_do_not_mix(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    result = runner.invoke(cli, ["connect", "--config", str(path), "--device", "d"], env={})
    assert result.exit_code == 2
    assert "give either --config or --device" in one_error_line(result.output)


def test_the_example_config_is_valid(tmp_path: Path) -> None:
    import shutil

    from tunnelctl.client_config import load_client_config

    example = Path(__file__).resolve().parent.parent / "examples" / "client.toml"
    shutil.copy(example, tmp_path / "client.toml")
    (tmp_path / "alice.jwt").write_text(CLIENT)
    loaded = load_client_config(str(tmp_path / "client.toml"), {})
    assert [d.device for d in loaded.plan.devices] == ["laptop", "nas"]
    assert [f.service for f in loaded.plan.devices[1].forwards] == ["files", "db"]


def test_the_client_unit_runs_connect_with_a_config() -> None:
    unit = Path(__file__).resolve().parent.parent / "scripts" / "tunnelctl-client.service"
    (exec_start,) = [
        line.split("=", 1)[1]
        for line in unit.read_text().splitlines()
        if line.startswith("ExecStart=")
    ]
    args = exec_start.split()[1:]
    assert args[:2] == ["connect", "--config"] and "--wait" in args


def test_the_stdio_fast_path_knows_every_valued_option_of_connect() -> None:
    """tunnelctl/entry.py reads connect's command line without click: it must know
    which options take a value, or it would misread the ones after them."""
    from tunnelctl.cli import connect
    from tunnelctl.entry import _VALUED

    valued = {
        name
        for param in connect.params
        if not getattr(param, "is_flag", False) and not getattr(param, "_flag_needs_value", False)
        for name in param.opts
        if name.startswith("--")
    }
    assert valued == _VALUED


def test_the_stdio_fast_path_leaves_anything_unusual_to_the_cli() -> None:
    from tunnelctl.entry import _connect_options

    assert _connect_options(["connect", "--device=d", "--service", "s", "--stdio"]) == {
        "--device": ["d"],
        "--service": ["s"],
        "--stdio": [],
    }
    assert _connect_options(["connect", "--stdio", "--help"]) is None
    assert _connect_options(["connect", "--stdio", "--wait"]) is None
    assert _connect_options(["status", "--client"]) is None


def test_a_refusal_in_protocol_terms_is_said_in_user_terms() -> None:
    from workers.client import _user_words

    said = _user_words("signaling server refused: a device may not send list_devices")
    assert said.startswith("this token is a device token; connect needs a client token")
    assert _user_words("token expired") == "signaling server refused: token expired"
