import random

import pytest

from protocol.backoff import Backoff


def test_delays_grow_exponentially_up_to_the_cap_with_full_jitter() -> None:
    backoff = Backoff(base=0.5, cap=8.0, floor=0.0, rng=random.Random(1))
    ceilings = [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    for ceiling in ceilings:
        delay = backoff.next_delay()
        assert 0.0 <= delay <= ceiling
    assert backoff.attempts == len(ceilings)


def test_jitter_spreads_peers_that_failed_together() -> None:
    delays = {
        round(Backoff(rng=random.Random(seed), attempts=5).next_delay(), 6) for seed in range(50)
    }
    assert len(delays) == 50


def test_reset_starts_over_and_huge_attempt_counts_stay_capped() -> None:
    backoff = Backoff(base=1.0, cap=30.0, floor=0.5, rng=random.Random(3), attempts=10_000)
    assert 0.5 <= backoff.next_delay() <= 30.0
    backoff.reset()
    assert backoff.attempts == 0
    assert 0.5 <= backoff.next_delay() <= 1.0


def test_inconsistent_bounds_are_rejected() -> None:
    with pytest.raises(ValueError):
        Backoff(base=10.0, cap=1.0)
