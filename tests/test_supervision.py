"""Restart policy, heartbeats and session states, with time injected."""

from __future__ import annotations

import random

import pytest

from protocol.backoff import Backoff
from protocol.supervision import (
    TRANSITIONS,
    HeartbeatMonitor,
    IllegalTransition,
    Refuse,
    RestartPolicy,
    SessionEvent,
    SessionState,
    StartAfter,
    StartNow,
    transition,
)


def policy(max_restarts: int = 3, window: float = 60.0) -> RestartPolicy:
    return RestartPolicy(
        max_restarts, window, Backoff(base=1.0, cap=8.0, floor=0.5, rng=random.Random(5))
    )


def test_no_crash_starts_at_once() -> None:
    assert policy().decide(now=100.0) == StartNow()


def test_crashes_back_off_exponentially_then_refuse_until_the_window_slides() -> None:
    p = policy(max_restarts=3, window=60.0)
    ceilings = []
    for i in range(3):
        p.record_crash(now=100.0 + i)
        decision = p.decide(now=100.0 + i)
        assert isinstance(decision, StartAfter)
        ceilings.append(min(8.0, 1.0 * 2**i))
        assert 0.5 <= decision.delay <= ceilings[-1]
    p.record_crash(now=103.0)
    refused = p.decide(now=103.0)
    assert refused == Refuse(until=160.0, crashes=4)
    # Still refused just before the first crash leaves the window, not after.
    assert isinstance(p.decide(now=159.9), Refuse)
    assert p.decide(now=160.0) == StartNow()  # 3 crashes left in the window, long ago


def test_delay_counts_from_the_crash_so_a_slow_client_waits_less() -> None:
    p = policy()
    p.record_crash(now=10.0)
    assert p.decide(now=10.0 + 1.0) == StartNow()  # the whole delay already passed


def test_crashes_age_out_and_the_lineage_becomes_idle() -> None:
    p = policy(window=30.0)
    p.record_crash(now=0.0)
    assert not p.idle(now=29.0)
    assert p.idle(now=30.0)
    assert p.decide(now=30.0) == StartNow()


def test_zero_restarts_refuses_after_the_first_crash() -> None:
    p = policy(max_restarts=0)
    p.record_crash(now=1.0)
    assert isinstance(p.decide(now=1.0), Refuse)


def test_bad_policy_values_are_rejected() -> None:
    with pytest.raises(ValueError):
        RestartPolicy(max_restarts=-1)
    with pytest.raises(ValueError):
        RestartPolicy(window=0)


def test_heartbeat_monitor() -> None:
    hb = HeartbeatMonitor(timeout=5.0, last=100.0)
    assert not hb.expired(now=105.0)
    assert hb.expired(now=105.01)
    hb.beat(now=104.0)
    assert hb.deadline == 109.0 and not hb.expired(now=108.0)
    hb.beat(now=50.0)  # a stale timestamp never moves the deadline back
    assert hb.deadline == 109.0
    with pytest.raises(ValueError):
        HeartbeatMonitor(timeout=0, last=0)


@pytest.mark.parametrize(
    ("path", "end"),
    [
        ([SessionEvent.CONNECTED, SessionEvent.ENDED], SessionState.EXITED),
        ([SessionEvent.CONNECTED, SessionEvent.CRASHED], SessionState.EXITED),
        ([SessionEvent.CONNECTED, SessionEvent.STOP, SessionEvent.EXITED], SessionState.EXITED),
        ([SessionEvent.STOP, SessionEvent.CRASHED], SessionState.EXITED),
        ([SessionEvent.CRASHED], SessionState.EXITED),
    ],
)
def test_paths_from_starting(path: list[SessionEvent], end: SessionState) -> None:
    state = SessionState.STARTING
    for event in path:
        state = transition(state, event)
    assert state is end


def test_backoff_leads_to_starting_or_is_cancelled() -> None:
    assert transition(SessionState.BACKOFF, SessionEvent.ELAPSED) is SessionState.STARTING
    assert transition(SessionState.BACKOFF, SessionEvent.STOP) is SessionState.EXITED


def test_every_transition_not_in_the_table_is_a_named_error() -> None:
    for state in SessionState:
        for event in SessionEvent:
            if (state, event) in TRANSITIONS:
                continue
            with pytest.raises(IllegalTransition, match=f"from {state.value} on {event.value}"):
                transition(state, event)
    # exited and fatal are final
    assert not [k for k in TRANSITIONS if k[0] in (SessionState.EXITED, SessionState.FATAL)]


def test_deciding_is_a_query_it_changes_nothing() -> None:
    p = policy(max_restarts=3)
    p.record_crash(now=100.0)
    p.record_crash(now=101.0)
    first = p.decide(now=101.5)
    assert isinstance(first, StartAfter)
    assert [p.decide(now=101.5) for _ in range(5)] == [first] * 5
    assert p.crashes(now=101.5) == 2 and p.backoff.attempts == 0
