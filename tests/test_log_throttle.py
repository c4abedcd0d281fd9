"""aio/logs.py: LogThrottle lets a burst through per interval and counts the rest."""

from __future__ import annotations

import logging

import pytest

from aio.logs import LogThrottle


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
