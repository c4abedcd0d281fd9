"""The CLI contract scripts rely on: exit codes, one-line errors, --help."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from signaling.auth import verify_token
from tunnelctl.cli import cli

SECRET = "s" * 64


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_token_prints_a_verifiable_jwt(runner: CliRunner) -> None:
    result = runner.invoke(
        cli,
        [
            "token",
            "--sub",
            "alice",
            "--role",
            "client",
            "--device",
            "d1",
            "--device",
            "d2",
            "--ttl",
            "60",
        ],
        env={"TUNNEL_SECRET": SECRET},
    )
    assert result.exit_code == 0, result.output
    identity = verify_token(SECRET, result.output.strip())
    assert (identity.sub, identity.role, identity.devices) == (
        "alice",
        "client",
        frozenset({"d1", "d2"}),
    )


def test_token_reads_the_secret_file(runner: CliRunner, tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    result = runner.invoke(
        cli,
        ["token", "--sub", "dev", "--role", "device", "--secret-file", str(secret_file)],
        env={"TUNNEL_SECRET": ""},
    )
    assert result.exit_code == 0, result.output
    assert verify_token(SECRET, result.output.strip()).role == "device"


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["token", "--sub", "a", "--role", "client"],
            {"TUNNEL_SECRET": SECRET},
            "needs at least one --device",
        ),
        (
            ["token", "--sub", "a", "--role", "admin"],
            {"TUNNEL_SECRET": SECRET},
            "'admin' is not one of",
        ),
        (["token", "--sub", "../x", "--role", "device"], {"TUNNEL_SECRET": SECRET}, "id"),
        (["token", "--sub", "a", "--role", "device"], {"TUNNEL_SECRET": ""}, "TUNNEL_SECRET"),
        (["token", "--sub", "a", "--role", "device"], {"TUNNEL_SECRET": "short"}, "32"),
        (
            [
                "start",
                "--signal",
                "ws://127.0.0.1:1/signal",
                "--device",
                "d",
                "--token",
                "t",
                "--expose",
                "web",
            ],
            {},
            "expected NAME=URL",
        ),
        (
            [
                "start",
                "--signal",
                "ws://127.0.0.1:1/signal",
                "--device",
                "d",
                "--token",
                "t",
                "--expose",
                "a=tcp://127.0.0.1:1",
                "--expose",
                "a=tcp://127.0.0.1:2",
            ],
            {},
            "exposed twice",
        ),
        (
            [
                "start",
                "--signal",
                "ws://127.0.0.1:1/signal",
                "--device",
                "d",
                "--expose",
                "a=tcp://127.0.0.1:1",
            ],
            {"TUNNEL_TOKEN": ""},
            "a token is required",
        ),
        (
            [
                "connect",
                "--signal",
                "ws://127.0.0.1:1/signal",
                "--device",
                "d",
                "--token",
                "t",
                "--service",
                "web",
                "--listen",
                "nowhere",
            ],
            {},
            "bad --listen",
        ),
        (
            [
                "connect",
                "--signal",
                "ws://127.0.0.1:1/signal",
                "--device",
                "d",
                "--token",
                "t",
                "--service",
                "web",
                "--stun",
                "http://x",
            ],
            {},
            "bad ICE server URL",
        ),
        (
            [
                "connect",
                "--signal",
                "ws://127.0.0.1:1/signal",
                "--device",
                "d",
                "--token",
                "t",
                "--service",
                "web",
                "--turn",
                "turn:127.0.0.1:3478",
            ],
            {},
            "needs a username",
        ),
        (
            [
                "connect",
                "--signal",
                "ws://127.0.0.1:1/signal",
                "--device",
                "d",
                "--token",
                "t",
                "--service",
                "web",
                "--ice-host",
                "bogus",
            ],
            {},
            "bad ICE host address",
        ),
    ],
)
def test_usage_errors_exit_2_with_a_clear_message(
    runner: CliRunner, args: list[str], env: dict[str, str], message: str
) -> None:
    result = runner.invoke(cli, args, env=env)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_every_verb_has_help(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for verb in ("signal", "token", "start", "connect", "devices", "demo"):
        assert verb in result.output
        sub = runner.invoke(cli, [verb, "--help"])
        assert sub.exit_code == 0
        assert f"cli {verb} [OPTIONS]" in sub.output


def test_connect_to_a_dead_signaling_server_fails_with_one_line(runner: CliRunner) -> None:
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = runner.invoke(
        cli,
        [
            "connect",
            "--signal",
            f"ws://127.0.0.1:{port}/signal",
            "--device",
            "d",
            "--token",
            "t",
            "--service",
            "web",
        ],
        env={},
    )
    assert result.exit_code == 1
    assert "tunnelctl: error: cannot reach the signaling server" in result.output


def test_signal_on_a_busy_port_fails_with_one_line(runner: CliRunner) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(cli, ["signal", "--port", str(port)], env={"TUNNEL_SECRET": SECRET})
    assert result.exit_code == 1
    assert f"tunnelctl: error: cannot listen on 127.0.0.1:{port}" in result.output


def test_signal_with_an_unreachable_redis_fails_with_one_line(runner: CliRunner) -> None:
    import socket

    with socket.socket() as sock:  # bound, never listening: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        result = runner.invoke(
            cli,
            ["signal", "--port", "0", "--redis", f"redis://:hunter2@127.0.0.1:{port}/0"],
            env={"TUNNEL_SECRET": SECRET},
        )
    assert result.exit_code == 1
    assert "tunnelctl: error: cannot use Redis at redis://***@127.0.0.1" in result.output
    assert "hunter2" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--node-id", "a"], "--node-id needs --redis"),
        (["--redis", "redis://127.0.0.1:1/0", "--node-id", "../a"], "not a valid id"),
    ],
)
def test_signal_node_id_usage_errors(runner: CliRunner, args: list[str], message: str) -> None:
    result = runner.invoke(cli, ["signal", *args], env={"TUNNEL_SECRET": SECRET})
    assert result.exit_code == 2
    assert message in result.output
