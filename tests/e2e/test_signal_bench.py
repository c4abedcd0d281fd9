"""scripts/signal_bench.py runs end to end on small counts and writes sane JSON.

Only the shape and plausibility of the figures are checked: their values are
for README, and a loaded machine moves them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent

pytestmark = pytest.mark.e2e


def test_signal_bench_small_run(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (scripts/install-system-deps.sh)")
    out = tmp_path / "figures.json"
    args = ["--connections", "20,50", "--setups", "100", "--latency-samples", "20"]
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "signal_bench.py"), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert [row["connections"] for row in figures["memory"]] == [20, 50]
    for row in figures["memory"]:
        assert row["rss_after_mib"] > 0 and row["connect_and_register_per_s"] > 0
    layouts = [row["layout"] for row in figures["sessions"]["rate"]]
    assert len(layouts) == 3 and "two nodes" in layouts[2]
    for rate in figures["sessions"]["rate"]:
        assert rate["setups_per_s"] > 0
    for latency in figures["sessions"]["latency"]:
        assert 0 < latency["p50_ms"] <= latency["p90_ms"]
    assert "Added set-up latency across two nodes" in run.stdout
