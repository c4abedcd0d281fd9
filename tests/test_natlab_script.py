"""scripts/natlab.py without a lab: its command line, path labels and TURN credentials.

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
    ("line", "path", "pair"),
    [
        (
            "forwarding 127.0.0.1:3281 -> d/web (DataChannel open in 83 ms, "
            "direct path (host/host))",
            "direct",
            "host/host",
        ),
        (
            "forwarding 127.0.0.1:3281 -> d/web (DataChannel open in 601 ms, "
            "relay path (relay/srflx over tcp))",
            "relay",
            "relay/srflx",
        ),
        ("forwarding 127.0.0.1:3281 -> d/web (DataChannel open in 5 ms, unknown path)", None, None),
    ],
)
def test_connects_readiness_line_gives_the_path_and_pair(
    line: str, path: str | None, pair: str | None
) -> None:
    match = natlab.FORWARDING_RE.search(line)
    assert match is not None
    assert (match["addr"], match["path"], match["pair"]) == ("127.0.0.1:3281", path, pair)


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
    result = natlab.CaseResult("cone", "symmetric", connected=True, path="relay", pair="host/relay")
    fields = dataclasses.asdict(result)
    for key in ("device_nat", "client_nat", "path", "pair", "connect_ms", "transfer_ok", "mbps"):
        assert key in fields
    row = natlab.table_row(result)
    assert row.split()[:4] == ["cone", "symmetric", "relay", "host/relay"]
    assert "FAILED" in row
