"""The benchmark runs end to end (``scripts/bench.py --quick``) and writes sane JSON.

Only the shape and plausibility of the results are checked here, never the
goals (set-up ratio, memory per session, throughput, latency): those are for
the report, and a loaded test machine would make them flaky.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench.py"
#: The flat summary's figures (issue 10); each must be a positive number.
SUMMARY_NUMBERS = (
    "tunnel_download_mbps",
    "tunnel_upload_mbps",
    "direct_download_mbps",
    "request_p50_ms",
    "request_p99_ms",
    "direct_request_p50_ms",
    "direct_request_p99_ms",
    "echo_rate",
    "direct_echo_rate",
    "stock_dc_mbps",
    "project_dc_mbps",
    "stock_dc_echo_rate",
    "setup_p50_ms",
    "bare_setup_p50_ms",
    "pss_mib_per_session",
    "cpu_count",
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def check_times(name: str, stats: dict[str, Any], requested: int) -> None:
    assert stats["n"] == requested, (name, stats)
    assert 0 < stats["min_ms"] <= stats["p50_ms"] <= stats["p90_ms"] <= stats["max_ms"], (
        name,
        stats,
    )
    assert stats["max_ms"] < 60_000, (name, stats)
    assert len(stats["samples_ms"]) == requested


def check_memory(name: str, values: dict[str, Any]) -> None:
    assert 0 < values["pss_mib"] <= values["rss_mib"] < 4096, (name, values)


def is_positive_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


@pytest.mark.timeout(420)
def test_quick_benchmark_writes_sane_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    # 1 means "ran, but saw a failure" (listed in the JSON); anything else is a crash.
    assert done.returncode in (0, 1), done.stderr[-3000:]
    assert "session set-up" in done.stdout and "memory" in done.stdout, done.stdout
    assert "data path" in done.stdout and "goals" in done.stdout, done.stdout
    report = json.loads(out.read_text())
    problems = report["problems"]

    assert report["params"] == {
        "sessions": 5,
        "memory_sessions": 10,
        "warmup": 1,
        "quick": True,
        "only": None,
    }
    machine = report["machine"]
    assert machine["cpus"] >= 1 and machine["python"].startswith("3.")
    assert len(machine["loadavg_start"]) == len(machine["loadavg_end"]) == 3

    setup = report["setup"]
    for kind in ("warm", "cold", "bare"):
        assert setup[kind]["failed"] == 0, problems
        check_times(kind, setup[kind], 5)
        assert sum(setup[kind]["paths"].values()) == 5, setup[kind]
    assert setup["warm_over_bare"] > 0 and setup["cold_over_bare"] > 0
    assert 0 <= setup["warm"]["prefork_hits"] <= 5
    check_times("spawn", report["spawn"], 5)

    memory = report["memory"]
    assert memory["requested"] == memory["opened"] == memory["workers_measured"] == 10, problems
    check_times("memory open", memory["open_ms"], 10)
    assert len(memory["workers"]) == 10
    assert len({w["pid"] for w in memory["workers"]}) == 10
    for worker in memory["workers"]:
        check_memory(f"worker {worker['pid']}", worker)
    for name in ("fork_server", "supervisor"):
        check_memory(name, memory[name])
    per_session = memory["pss_per_session_mib"]
    assert 0 < per_session["mean"] <= per_session["max"]
    assert memory["rss_per_session_mib"]["mean"] >= per_session["mean"]
    assert memory["total_pss_mib"] >= sum(w["pss_mib"] for w in memory["workers"])
    assert memory["total_pss_mib"] <= memory["total_rss_mib"]
    assert isinstance(problems, list) and isinstance(report["notes"], list)

    summary = report["summary"]
    for key in SUMMARY_NUMBERS:
        assert is_positive_number(summary[key]), (key, summary[key], problems)
    assert set(summary["aggregate_mbps"]) == {"1", "2", "4"}
    for sessions, value in summary["aggregate_mbps"].items():
        assert is_positive_number(value), (sessions, value, problems)
    # A fraction; 0 is real: an idle supervisor may use no clock tick in a short round.
    share = summary["supervisor_cpu_share"]
    assert isinstance(share, float) and 0 <= share < 1, (share, problems)
    assert summary["cpu_count"] == machine["cpus"]
    assert summary["request_p50_ms"] <= summary["request_p99_ms"]
    figures = report["data_path"]["figures"]
    for key in ("tunnel_download_mbps", "tunnel_upload_mbps", "echo_rate"):
        assert figures[key]["min"] <= figures[key]["median"] <= figures[key]["max"], figures[key]
    for name, value in report["ratios"].items():
        assert value is None or is_positive_number(value), (name, value)
    assert is_positive_number(report["ratios"]["tunnel_download_over_stock_dc"])
    assert is_positive_number(report["ratios"]["echo_over_stock_dc_echo"])
