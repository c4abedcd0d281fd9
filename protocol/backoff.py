"""Capped exponential backoff with full jitter, sans-I/O.

The "full jitter" variant of exponential backoff (sleep a uniform random time
between 0 and ``min(cap, base * 2**attempt)``) spreads the reconnects of many
peers after a shared outage, so a restarted signaling server is not hit by all
of them in the same instant. Randomness is injected (``rng``) so tests can pin it.

Use: call :meth:`Backoff.next_delay` after each failure and sleep that long,
:meth:`Backoff.reset` after a success.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    """Delays for successive retries: ``uniform(floor, min(cap, base * 2**n))``."""

    base: float = 0.5
    cap: float = 30.0
    floor: float = 0.05
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.floor <= self.base <= self.cap:
            raise ValueError("backoff needs 0 <= floor <= base <= cap")

    def next_delay(self) -> float:
        """Return the delay before the next retry and count the attempt."""
        delay = self.delay(self.attempts, self.rng.random())
        self.attempts += 1
        return delay

    def delay(self, attempt: int, fraction: float) -> float:
        """The delay of retry number ``attempt`` (from 0) for a jitter ``fraction``
        in [0, 1): a pure function, for callers that draw the jitter themselves."""
        # 2**attempt overflows float long after it passes any sane cap.
        ceiling = min(self.cap, self.base * 2.0 ** min(attempt, 62))
        return self.floor + (ceiling - self.floor) * fraction

    def reset(self) -> None:
        """Forget past failures (call after a success)."""
        self.attempts = 0
