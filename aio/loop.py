"""The event loop of the processes on the tunnel's data path.

uvloop (libuv) runs the loop's own work, selecting, scheduling callbacks and
timers, socket reads and writes, in C: the per-packet cost that aiortc pays
on every UDP datagram and the bridge on every TCP read. Measured in
``scripts/bench.py`` (issue 10). It is used where it imports; elsewhere, and
with ``TUNNELCTL_EVENT_LOOP=asyncio`` in the environment (to compare, or to
rule it out), the stock asyncio loop runs.

uvloop is imported with this module, so a process that imports it before
forking (the workers' fork server) shares uvloop's pages with its children.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from types import ModuleType
from typing import Any, TypeVar

__all__ = ["ENV", "loop_name", "run"]

ENV = "TUNNELCTL_EVENT_LOOP"

T = TypeVar("T")

_uvloop: ModuleType | None
try:
    import uvloop as _uvloop
except ImportError:  # not built for this platform: the stock loop will do
    _uvloop = None


def loop_name() -> str:
    """``uvloop`` or ``asyncio``: the loop :func:`run` uses in this environment."""
    if _uvloop is None or os.environ.get(ENV, "").strip().lower() == "asyncio":
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop :func:`loop_name` names."""
    if _uvloop is not None and loop_name() == "uvloop":
        result: T = _uvloop.run(main)
        return result
    return asyncio.run(main)
