"""A tuned aiortc (workers.aiortc_tuning) against an untuned stock aiortc, both ways.

Each case runs ``scripts/dcbench.py --stack mixed``: two processes, one tuned
and one stock, run twice so that the tuned side sends to the stock side and
the stock side to the tuned one. The receiver checks a CRC-32 of every byte
(throughput) or the order and content of every reply (echo); figures are
printed, not asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
DCBENCH = ROOT / "scripts" / "dcbench.py"

pytestmark = pytest.mark.e2e


def mixed(*args: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, str(DCBENCH), "--stack", "mixed", "--timeout", "60", "--json", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    print(f"\n{report}")
    return report


def check_sides(report: dict[str, object]) -> None:
    directions = report["directions"]
    assert isinstance(directions, dict)
    tuned_device = directions["tuned device, stock client"]["sides"]
    stock_device = directions["stock device, tuned client"]["sides"]
    assert tuned_device["device"]["tuned"] and not tuned_device["client"]["tuned"]
    assert not stock_device["device"]["tuned"] and stock_device["client"]["tuned"]


def test_bulk_data_crosses_between_tuned_and_stock_aiortc_both_ways() -> None:
    report = mixed("--test", "throughput", "--bytes", str(8 * 1024 * 1024 + 4321))
    check_sides(report)
    for run in report["directions"].values():  # type: ignore[attr-defined]
        assert run["bytes"] == 8 * 1024 * 1024 + 4321 and run["mbps"] > 0


def test_small_messages_echo_between_tuned_and_stock_aiortc_both_ways() -> None:
    report = mixed("--test", "echo", "--seconds", "1")
    check_sides(report)
    for run in report["directions"].values():  # type: ignore[attr-defined]
        assert run["round_trips"] > 10
