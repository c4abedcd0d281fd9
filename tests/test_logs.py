"""aio/logs.py: secrets redacted from every log line; LogThrottle's burst and count."""

from __future__ import annotations

import logging
import sys

import pytest

from aio.logs import LogThrottle, RedactSecrets, redact, redact_all_logs
from signaling.auth import issue_token

TOKEN = issue_token("k" * 64, sub="alice", role="client", devices=["dev1"])


@pytest.mark.parametrize(
    ("line", "secret"),
    [
        (f"GET /signal?token={TOKEN} HTTP/1.1", TOKEN.split(".")[2]),
        (f'> TEXT \'{{"v":1,"type":"auth","token":"{TOKEN[:60]}...\' [300 bytes]', "eyJ"),
        ('< TEXT \'{"urls":"turn:h","username":"1:d","credential": "c2VjcmV0"}\'', "c2VjcmV0"),
        ("turn:h?transport=udp user=1:d password=hunter2hunter2", "hunter2"),
        (f"a bare token {TOKEN[:20]} cut short", TOKEN[:20]),
    ],
)
def test_redact_removes_tokens_and_credentials(line: str, secret: str) -> None:
    cleaned = redact(line)
    assert secret not in cleaned and "<redacted>" in cleaned


def test_lines_without_secrets_are_unchanged() -> None:
    for line in ("token expired", "session s-1: connected", "closes.4401", "secret file x"):
        assert redact(line) == line


def test_every_logger_s_lines_are_redacted_once_installed() -> None:
    """Third-party debug output (websockets, aioice) and tracebacks included."""
    root = logging.getLogger()
    handler = logging.StreamHandler()
    root.addHandler(handler)
    try:
        redact_all_logs()
        redact_all_logs()  # idempotent
        assert sum(isinstance(f, RedactSecrets) for f in handler.filters) == 1
        record = logging.LogRecord("aioice.turn", logging.DEBUG, __file__, 1, "%s", (TOKEN,), None)
        try:
            raise ValueError(f"bad token {TOKEN}")
        except ValueError:
            record.exc_info = sys.exc_info()
        assert handler.filter(record)
        assert TOKEN not in record.getMessage()
        assert record.exc_text is not None and TOKEN.split(".")[2] not in record.exc_text
    finally:
        root.removeHandler(handler)


def test_a_burst_per_interval_then_the_count_of_what_was_suppressed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    log = logging.getLogger("tests.throttle")
    throttle = LogThrottle(log, interval=10.0, burst=2, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="tests.throttle"):
        sent = [throttle.warning("auth", "failed %d", n) for n in range(5)]
        assert throttle.warning("other", "a different kind") is True
        now[0] = 10.0
        throttle.warning("auth", "failed %d", 5)
    assert sent == [True, True, False, False, False]
    assert [r.getMessage() for r in caplog.records] == [
        "failed 0",
        "failed 1",
        "a different kind",
        "failed 5 (3 similar line(s) suppressed in the previous 10 s)",
    ]


def test_a_disabled_level_costs_nothing_and_counts_nothing() -> None:
    log = logging.getLogger("tests.throttle.quiet")
    log.setLevel(logging.WARNING)
    throttle = LogThrottle(log, burst=1)
    assert [throttle.info("k", "x") for _ in range(3)] == [False] * 3
    assert throttle.suppressed("k") == 0
