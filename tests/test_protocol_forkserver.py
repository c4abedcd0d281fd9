"""The fork server's line protocol (PROTOCOL.md §5): test vectors, both directions."""

from __future__ import annotations

import pytest

from protocol.forkserver import (
    MAX_LINE,
    Configure,
    Exited,
    ForkServerLineError,
    Ready,
    Refused,
    Spawn,
    Spawned,
    decode_command,
    decode_report,
    describe_exit,
    encode_command,
    encode_report,
)
from protocol.ice import IceConfig, IceServer

WORKER = "w-0123456789abcdef"
TURN = IceServer("turn:198.51.100.7:3478?transport=tcp", "1700000000:dev-a", "c3VwZXI=")

#: PROTOCOL.md §5.1, byte for byte.
COMMANDS = [
    (b"spawn w-0123456789abcdef\n", Spawn(WORKER)),
    (
        b'config {"ice_servers": [], "ice_hosts": [], "ice_policy": "all"}\n',
        Configure(IceConfig()),
    ),
    (
        b'config {"ice_servers": [{"url": "turn:198.51.100.7:3478?transport=tcp", '
        b'"username": "1700000000:dev-a", "credential": "c3VwZXI="}], '
        b'"ice_hosts": ["127.0.0.1/32"], "ice_policy": "relay"}\n',
        Configure(IceConfig((TURN,), ("127.0.0.1/32",), "relay")),
    ),
]
REPORTS = [
    (b"ready 4242\n", Ready(4242)),
    (b"spawned w-0123456789abcdef 4243\n", Spawned(WORKER, 4243)),
    (b"exited 4243 0\n", Exited(4243, 0)),
    (b"exited 4243 -9\n", Exited(4243, -9)),
    (b"error bad command 'fork'\n", Refused("bad command 'fork'")),
]


@pytest.mark.parametrize(("line", "command"), COMMANDS)
def test_command_vectors(line: bytes, command: Spawn | Configure) -> None:
    assert encode_command(command) == line
    assert decode_command(line) == command
    assert decode_command(line.rstrip(b"\n")) == command


@pytest.mark.parametrize(("line", "report"), REPORTS)
def test_report_vectors(line: bytes, report: Ready | Spawned | Exited | Refused) -> None:
    assert encode_report(report) == line
    assert decode_report(line) == report


def test_an_old_config_without_a_policy_means_all() -> None:
    assert decode_command(b'config {"ice_servers": [], "ice_hosts": []}') == Configure(IceConfig())


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"fork w-0123456789abcdef", "bad command 'fork w-0123456789abcdef'"),
        (b"spawn w-0123", "bad command 'spawn w-0123'"),
        (b"spawn W-0123456789ABCDEF", "bad command"),
        (b"config {", "bad config: JSONDecodeError"),
        (b'config {"ice_servers": 1, "ice_hosts": []}', "bad config: TypeError"),
        (
            b'config {"ice_servers": [{"url": "http://x"}], "ice_hosts": []}',
            "bad config: ValueError",
        ),
        (b"spawn w-0123456789abcde\xff", "not ASCII"),
        (b"spawn " + b"x" * MAX_LINE, "line too long"),
    ],
)
def test_bad_commands_are_one_line_errors(line: bytes, error: str) -> None:
    with pytest.raises(ForkServerLineError, match=error.replace("(", r"\(")) as info:
        decode_command(line)
    assert "\n" not in str(info.value)


def test_a_bad_config_never_quotes_a_credential() -> None:
    line = b'config {"ice_servers": [{"url": "turn:x", "credential": "hunter2"}], "ice_hosts": []}'
    with pytest.raises(ForkServerLineError) as info:
        decode_command(line)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    "line",
    [
        b"ready",
        b"ready x",
        b"ready 0",
        b"ready 1 2",
        b"spawned w-0123456789abcdef",
        b"spawned nobody 12",
        b"exited 12",
        b"exited 12 999",
        b"exited 12 1e3",
        b"error",
        b"hello",
        b"",
    ],
)
def test_bad_reports_raise_one_error_type(line: bytes) -> None:
    with pytest.raises(ForkServerLineError):
        decode_report(line)


def test_describe_exit() -> None:
    assert describe_exit(0) == "exit code 0"
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(-11) == "killed by SIGSEGV"
    assert describe_exit(-200) == "killed by signal 200"
