"""The event loop of the processes on the tunnel's data path.

uvloop (libuv) runs the loop's own work, selecting, scheduling callbacks and
timers, socket reads and writes, in C: the per-packet cost that aiortc pays
on every UDP datagram and the bridge on every TCP read. Measured in
``scripts/bench.py`` (issue 10). It is used where it imports; elsewhere, and
with ``TUNNELCTL_EVENT_LOOP=asyncio`` in the environment (to compare, or to
rule it out), the stock asyncio loop runs.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["ENV", "loop_name", "run"]

ENV = "TUNNELCTL_EVENT_LOOP"

T = TypeVar("T")


def loop_name() -> str:
    """``uvloop`` or ``asyncio``: the loop :func:`run` uses in this environment."""
    if os.environ.get(ENV, "").strip().lower() == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop :func:`loop_name` names."""
    if loop_name() == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
