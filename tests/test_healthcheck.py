"""scripts/healthcheck.sh: its verdicts and exit codes, against a fake `tunnelctl status`.

The fake is an executable written into tmp_path and passed as $TUNNELCTL: it
records how it was called, prints canned output and exits with a chosen code,
which is all the script sees of tunnelctl. One test runs the real CLI for the
"not running" case, to hold the script and the CLI to the same exit-code contract.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "healthcheck.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def status(*devices: tuple[str, str, str], state: str = "running") -> str:
    """A status JSON in the README's shape; devices are (id, link, state)."""
    return json.dumps(
        {
            "pid": 4242,
            "uptime_s": 12.5,
            "state": state,
            "runtime_dir": "/run/tunnelctl",
            "devices": [
                {"id": d, "link": link, "state": health, "sessions": 1, "services": ["web"]}
                for d, link, health in devices
            ],
            "pool": {"idle": 2, "target": 2},
            "sessions": 3,
        },
        indent=2,
    )


def fake_tunnelctl(
    tmp_path: Path, *, stdout: str = "", stderr: str = "", rc: int = 0, sleep: float = 0
) -> Path:
    script = tmp_path / "tunnelctl"
    calls = tmp_path / "calls.jsonl"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys, time\n"
        f"with open({str(calls)!r}, 'a') as fh:\n"
        "    call = {'argv': sys.argv[1:], 'runtime_dir': os.environ.get('TUNNEL_RUNTIME_DIR')}\n"
        "    fh.write(json.dumps(call) + '\\n')\n"
        f"time.sleep({sleep})\n"
        f"sys.stdout.write({stdout!r})\n"
        f"sys.stderr.write({stderr!r})\n"
        f"sys.exit({rc})\n"
    )
    script.chmod(0o755)
    return script


def calls(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(tunnelctl: Path | str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "TUNNEL_RUNTIME_DIR"}
    environ |= {"TUNNELCTL": str(tunnelctl), **env}
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def verdict(result: subprocess.CompletedProcess[str]) -> tuple[int, str]:
    """The exit code and the one line the script printed (it must print exactly one)."""
    assert result.stdout.count("\n") == 1 and result.stdout.endswith("\n"), result.stdout
    assert result.stderr == ""
    return result.returncode, result.stdout.rstrip("\n")


def test_healthy(tmp_path: Path) -> None:
    fake = fake_tunnelctl(tmp_path, stdout=status(("laptop", "up", "ok"), ("nas", "up", "ok")))
    assert verdict(run(fake)) == (0, "ok: 2/2 devices up, 3 sessions, supervisor pid 4242 running")
    assert calls(tmp_path) == [{"argv": ["status", "--json"], "runtime_dir": None}]


@pytest.mark.parametrize("form", ["separate", "joined"])
def test_runtime_dir_reaches_tunnelctl(tmp_path: Path, form: str) -> None:
    fake = fake_tunnelctl(tmp_path, stdout=status(("laptop", "up", "ok")))
    args = ["--runtime-dir", "/run/tunnelctl"] if form == "separate" else ["--runtime-dir=/run/x"]
    assert verdict(run(fake, *args))[0] == 0
    expected = "/run/tunnelctl" if form == "separate" else "/run/x"
    assert calls(tmp_path) == [{"argv": ["status", "--json"], "runtime_dir": expected}]


def test_not_running_says_why_from_tunnelctls_error_line(tmp_path: Path) -> None:
    fake = fake_tunnelctl(
        tmp_path,
        stderr="tunnelctl: error: no supervisor running (nothing listens in /run/tunnelctl)\n",
        rc=3,
    )
    assert verdict(run(fake)) == (
        2,
        "not running: no supervisor running (nothing listens in /run/tunnelctl)",
    )


def test_not_running_without_a_message(tmp_path: Path) -> None:
    fake = fake_tunnelctl(tmp_path, stdout=status(("laptop", "up", "ok")), rc=1)
    assert verdict(run(fake)) == (2, "not running: tunnelctl status exited with 1")


def test_a_fatal_device_is_unhealthy_even_with_enough_up(tmp_path: Path) -> None:
    fake = fake_tunnelctl(tmp_path, stdout=status(("laptop", "up", "ok"), ("nas", "down", "fatal")))
    assert verdict(run(fake)) == (1, "unhealthy: device nas fatal; 1/2 devices up")


def test_fewer_devices_up_than_required(tmp_path: Path) -> None:
    fake = fake_tunnelctl(
        tmp_path,
        stdout=status(
            ("laptop", "up", "ok"), ("nas", "connecting", "ok"), ("pi", "down", "backoff")
        ),
    )
    assert verdict(run(fake, "--min-devices-up", "2")) == (
        1,
        "unhealthy: 1/3 devices up, need 2 (nas connecting, pi down)",
    )
    assert verdict(run(fake, "--min-devices-up=1"))[0] == 0


def test_by_default_one_device_must_be_up(tmp_path: Path) -> None:
    fake = fake_tunnelctl(tmp_path, stdout=status(("laptop", "down", "ok")))
    assert verdict(run(fake)) == (1, "unhealthy: 0/1 devices up, need 1 (laptop down)")
    assert verdict(run(fake, "--min-devices-up", "0")) == (
        0,
        "ok: 0/1 devices up, 3 sessions, supervisor pid 4242 running",
    )


def test_backoff_and_stopping_are_reported_but_healthy(tmp_path: Path) -> None:
    fake = fake_tunnelctl(tmp_path, stdout=status(("laptop", "up", "backoff"), state="stopping"))
    assert verdict(run(fake)) == (0, "ok: 1/1 devices up, 3 sessions, supervisor pid 4242 stopping")


@pytest.mark.parametrize(
    ("stdout", "detail"),
    [
        ("", "JSONDecodeError"),
        ("supervisor is fine\n", "JSONDecodeError"),
        ('{"pid": 1, "state": "running", "sessions": 0}', "KeyError: 'devices'"),
        ('{"pid": 1, "state": "running", "sessions": 0, "devices": [{"id": "x"}]}', "KeyError"),
        ('{"pid": 1, "state": "running", "sessions": 0, "devices": 3}', "TypeError"),
    ],
)
def test_unreadable_status_is_not_taken_for_healthy(
    tmp_path: Path, stdout: str, detail: str
) -> None:
    code, line = verdict(run(fake_tunnelctl(tmp_path, stdout=stdout)))
    assert code == 2
    assert line.startswith("unknown: unreadable status JSON (")
    assert detail in line


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_a_status_that_hangs_is_cut_short(tmp_path: Path) -> None:
    fake = fake_tunnelctl(tmp_path, stdout=status(("laptop", "up", "ok")), sleep=30)
    assert verdict(run(fake, HEALTHCHECK_TIMEOUT="1")) == (
        2,
        "not running: tunnelctl status gave no answer within 1 s",
    )


def test_tunnelctl_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-tunnelctl"
    assert verdict(run(missing)) == (
        2,
        f"not running: cannot run {missing} (not found; set TUNNELCTL)",
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--verbose"], "healthcheck: unknown argument: --verbose (see --help)"),
        (["--runtime-dir"], "healthcheck: --runtime-dir needs a directory (see --help)"),
        (["--min-devices-up"], "healthcheck: --min-devices-up needs a number (see --help)"),
        (
            ["--min-devices-up", "-1"],
            "healthcheck: --min-devices-up must be a whole number, got '-1' (see --help)",
        ),
    ],
)
def test_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    result = run(fake_tunnelctl(tmp_path, stdout=status()), *args)
    assert (result.returncode, result.stdout, result.stderr) == (3, "", message + "\n")
    assert calls(tmp_path) == []


def test_help(tmp_path: Path) -> None:
    result = run(fake_tunnelctl(tmp_path), "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("Health check for a tunnelctl supervisor")
    assert "healthcheck.sh [--runtime-dir DIR] [--min-devices-up N]" in result.stdout
    assert calls(tmp_path) == []


def test_with_the_real_cli_no_supervisor_means_not_running(tmp_path: Path) -> None:
    wrapper = tmp_path / "tunnelctl"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m tunnelctl "$@"\n')
    wrapper.chmod(0o755)
    empty = tmp_path / "runtime"
    empty.mkdir(mode=0o700)
    code, line = verdict(run(wrapper, "--runtime-dir", str(empty)))
    assert code == 2
    assert line.startswith("not running: ") and str(empty) in line
