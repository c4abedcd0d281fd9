"""scripts/natlab.py without a lab: its command line, connect's line and TURN credentials.

The lab itself (namespaces, coturn, tunnelctl) is tested as root in
tests/e2e/test_natlab.py.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import time

import pytest

from tests.e2e.natlab_support import natlab


def test_not_root_is_one_clear_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(natlab.os, "geteuid", lambda: 1000)
    assert natlab.unavailable_reason() == "the NAT lab needs root (network namespaces and iptables)"


def test_the_cli_says_why_it_cannot_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(natlab, "unavailable_reason", lambda: "ip netns is unavailable here: no")
    assert natlab.main(["--json"]) == 1
    assert capsys.readouterr().err == "natlab: error: ip netns is unavailable here: no\n"


@pytest.mark.parametrize("bad", ["cone", "cone,", "cone,full-cone", "x,none", "none;cone"])
def test_a_bad_case_is_a_usage_error(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        natlab.main(["--case", bad])
    assert exited.value.code == 2
    assert "expected DEV,CLI with each one of none, cone, symmetric, udp-blocked" in (
        capsys.readouterr().err
    )


def test_a_case_names_two_nat_kinds() -> None:
    assert natlab.parse_case("udp-blocked,none") == ("udp-blocked", "none")


@pytest.mark.parametrize(
    ("line", "fields"),
    [
        (
            "forwarding 127.0.0.1:41234 -> dev-cone/web "
            "(DataChannel open in 61 ms, direct path (host/srflx))",
            ("127.0.0.1:41234", "61", "direct", "host/srflx", None),
        ),
        (
            "forwarding 127.0.0.1:9 -> d/web (DataChannel open in 5570 ms, "
            "relay path (relay/prflx over tcp))",
            ("127.0.0.1:9", "5570", "relay", "relay/prflx", "tcp"),
        ),
        (
            "forwarding 127.0.0.1:9 -> d/web (DataChannel open in 3 ms, unknown path)",
            ("127.0.0.1:9", "3", None, None, None),
        ),
    ],
)
def test_connects_readiness_line_gives_the_time_and_the_path(
    line: str, fields: tuple[str | None, ...]
) -> None:
    match = natlab.FORWARDING_RE.search(line)
    assert match is not None
    assert (match["addr"], match["ms"], match["path"], match["pair"], match["via"]) == fields


def test_static_turn_user() -> None:
    auth = natlab.TurnAuth("static")
    assert auth.credentials() == (auth.user, auth.password)
    assert auth.config_lines() == ["lt-cred-mech", f"user={auth.user}:{auth.password}"]


def test_turn_rest_credentials_follow_coturns_scheme() -> None:
    auth = natlab.TurnAuth("secret", secret="lab-secret")
    before = int(time.time())
    username, password = auth.credentials(ttl=600)
    expiry, _, name = username.partition(":")
    assert name == "natlab" and before + 600 <= int(expiry) <= int(time.time()) + 600
    mac = hmac.new(b"lab-secret", username.encode(), hashlib.sha1).digest()
    assert password == base64.b64encode(mac).decode()
    assert auth.config_lines() == ["use-auth-secret", "static-auth-secret=lab-secret"]


def test_a_case_reports_the_fields_the_issue_names() -> None:
    result = natlab.CaseResult(
        "cone",
        "symmetric",
        connected=True,
        path="relay",
        pair="host/relay",
        device_pair="relay/prflx",
    )
    fields = dataclasses.asdict(result)
    for key in ("device_nat", "client_nat", "path", "pair", "connect_ms", "transfer_ok", "mbps"):
        assert key in fields
    row = natlab.table_row(result)
    assert row.split()[:5] == ["cone", "symmetric", "relay", "host/relay", "relay/prflx"]
    assert "FAILED" in row


def test_warnings_are_listed_once_without_times_ids_or_pids() -> None:
    lines = [
        ("client", "15:49:37.159 tunnelctl.peer WARNING session vU6xXhzktnqLGmrkiZMVUA: lost"),
        ("client", "15:49:38.001 tunnelctl.peer WARNING session Ve7SS_zjvmVq4R3v6Bx6DA: lost"),
        ("client", "15:49:38.002 tunnelctl.client INFO session open"),
        ("device", "15:49:39.000 worker[4311] tunnelctl.x ERROR boom"),
    ]
    assert natlab.problem_lines(lines) == [
        "client: tunnelctl.peer WARNING session <id>: lost",
        "device: worker[<pid>] tunnelctl.x ERROR boom",
    ]
