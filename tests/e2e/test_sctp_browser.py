"""Chromium keeps working with the tuned SCTP: a few MiB both ways, checksummed.

The page (Debian's chromium through Playwright, headless) and a tuned aiortc
peer run in a network namespace of this test's own with only ``lo`` up, so
Chromium's candidates are loopback ones and nothing leaves the namespace. The
work is done by ``tests/e2e/browser_dc_peer.py``; see its docstring.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.e2e.netns_support import Netns, netns_unavailable

ROOT = Path(__file__).resolve().parent.parent.parent
CHROMIUM = Path("/usr/bin/chromium")
TOTAL = 4 * 1024 * 1024 + 999

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.timeout(240)
def test_chromium_exchanges_data_with_a_tuned_aiortc_peer_both_ways() -> None:
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium (scripts/install-system-deps.sh)")
    netns = Netns(name=f"tc-dcbr-{os.getpid()}")
    try:
        netns.create()
        done = netns.run(
            sys.executable,
            "-m",
            "tests.e2e.browser_dc_peer",
            "--bytes",
            str(TOTAL),
            "--timeout",
            "90",
            timeout=200,
        )
    finally:
        netns.delete()
    result = json.loads(done.stdout.splitlines()[-1])
    print(f"\n{result}")
    assert result["tuned"] is True
    assert result["bytes"] == TOTAL
    assert result["page_fnv"] == result["fnv"]
    assert result["echo_intact"] is True
