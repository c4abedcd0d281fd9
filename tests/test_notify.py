"""supervisor.notify against a real AF_UNIX datagram socket, and the unit that relies on it."""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.config import SupervisorConfig
from supervisor.notify import sd_notify

UNIT = Path(__file__).resolve().parent.parent / "scripts" / "tunnelctl.service"


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound where systemd would put $NOTIFY_SOCKET."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        yield sock, path


def test_sends_one_datagram_to_the_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    assert sd_notify("READY=1", {"NOTIFY_SOCKET": path}) is True
    assert sock.recv(4096) == b"READY=1"
    assert sd_notify("READY=1\nSTATUS=serving laptop, nas", {"NOTIFY_SOCKET": path}) is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving laptop, nas"


def test_reads_os_environ_by_default(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sd_notify("STOPPING=1") is True
    assert sock.recv(4096) == b"STOPPING=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sd_notify("STOPPING=1") is False


@pytest.mark.skipif(sys.platform != "linux", reason="abstract unix sockets are Linux-only")
def test_abstract_namespace_address() -> None:
    name = f"tunnelctl-test-{os.getpid()}-{os.urandom(4).hex()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert sd_notify("READY=1", {"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(4096) == b"READY=1"


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}])
def test_outside_systemd_it_does_nothing(env: dict[str, str]) -> None:
    assert sd_notify("READY=1", env) is False


def test_failures_are_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "tunnelctl.notify")
    assert sd_notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False
    assert "cannot notify systemd (READY=1)" in caplog.text
    assert sd_notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:9999"}) is False
    assert "not a unix socket address" in caplog.text


def test_an_empty_state_is_a_bug() -> None:
    with pytest.raises(ValueError, match="needs a state"):
        sd_notify("", {})


# --- scripts/tunnelctl.service ----------------------------------------------------


def unit_settings() -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {raw!r}"
        assert key not in current, f"{key} set twice"
        current[key] = value
    return sections


def seconds(value: str) -> float:
    units = {"s": 1, "min": 60}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return float(value.removesuffix(suffix)) * factor
    return float(value)


def test_the_unit_waits_for_ready_and_restarts_on_failure() -> None:
    service = unit_settings()["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["ExecStart"].endswith(" start --config /etc/tunnelctl/tunnel.toml")
    assert (service["Restart"], service["RestartSec"]) == ("on-failure", "2")
    assert service["KillSignal"] == "SIGTERM"
    # The graceful stop must finish before systemd escalates to SIGKILL.
    drain = SupervisorConfig.__dataclass_fields__["drain_timeout"].default
    assert isinstance(drain, float)
    assert seconds(service["TimeoutStopSec"]) > drain + 5


def test_the_unit_gives_a_private_runtime_dir_to_a_dedicated_user() -> None:
    service = unit_settings()["Service"]
    assert service["RuntimeDirectory"] == "tunnelctl"
    assert service["RuntimeDirectoryMode"] == "0700"
    assert service["Environment"] == "TUNNEL_RUNTIME_DIR=%t/tunnelctl"
    assert service["User"] not in ("", "root", "0")
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert service[key] == "yes", key
    assert service["ProtectSystem"] == "strict"
