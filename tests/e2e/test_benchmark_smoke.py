"""A few seconds of each benchmark, so that they keep working."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def run_benchmark(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m benchmarks.<module> ARGS`` as a newcomer runs it: no
    ISSUANCE_* settings of this test run; it must exit 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISSUANCE_")}
    result = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_the_pipeline_benchmark_runs_and_reports_ratios(tmp_path):
    result = run_benchmark("pipeline", "--quick", "--out", str(tmp_path))
    (report,) = tmp_path.glob("pipeline-*.json")
    results = json.loads(report.read_text())
    assert results["verify"]["clean"]
    assert all(v > 0 for v in results["ceilings"].values())
    assert results["pipeline_backlog"]["credited"] > 0
    assert results["latency"][0]["p99_ms"] is not None
    assert list(tmp_path.glob("pipeline-*.png"))
    assert "pipeline (drain) / this" in result.stdout


def test_the_cells_benchmark_runs_and_reports_the_overhead(tmp_path):
    result = run_benchmark("cells", "--claims", "600", "--repeats", "1", "--out", str(tmp_path))
    (report,) = tmp_path.glob("cells-*.json")
    results = json.loads(report.read_text())
    assert [len(results["cells"][n]["per_cell"]) for n in ("2", "3")] == [2, 3]
    assert all(c["claims_per_s"] > 0 for n in ("2", "3") for c in results["cells"][n]["per_cell"])
    assert results["layer_over_direct"] > 0
    assert "Projection (arithmetic, not a measurement)" in result.stdout


def test_the_growth_benchmark_runs_on_a_private_postgresql(tmp_path):
    result = run_benchmark(
        "growth", "--claims", "4000", "--window", "2000", "--shared-buffers", "128MB", "--out", str(tmp_path)
    )
    (path,) = tmp_path.glob("growth-*.json")
    report = json.loads(path.read_text())
    assert [(w["from"], w["to"]) for w in report["windows"]] == [(0, 2000), (2000, 4000)]
    assert all(w["pg_cpu_us_per_claim"] > 0 and w["claims_per_s"] > 0 for w in report["windows"])
    # Sizes, not the statistics' row counts: a backend reports those up to
    # seconds later, after a window of 2,000 claims may have ended.
    assert report["windows"][-1]["tables_at_end"]["claims"]["table_mb"] > 0
    # The instance is our own, started with the sized settings.
    assert report["settings"]["autovacuum"] == "on"
    assert report["settings"]["synchronous_commit"] == "on"
    assert report["settings"]["shared_buffers"] == "128MB"
    assert report["huge_pages"]["needed"] > 0  # asked of the server; reserved where the kernel allows
    assert report["outcomes"]["credited"] > 0
    assert report["last_over_first"] > 0
    assert "last/first window PostgreSQL CPU per claim" in result.stdout


def test_the_window_benchmark_takes_turns_between_windows(tmp_path):
    result = run_benchmark(
        "window", "--prefetch", "4,16", "--rounds", "2", "--backlog", "2000", "--seconds", "2",
        "--out", str(tmp_path),
    )  # fmt: skip
    (path,) = tmp_path.glob("window-*.json")
    report = json.loads(path.read_text())
    assert report["verify"]["clean"]
    assert [a["prefetch"] for a in report["arms"]] == [4, 16, 16, 4]
    assert all(a["sustained"]["decided_during"] > 0 and a["half"]["p99_ms"] for a in report["arms"])
    assert "sustained open loop by delivery window" in result.stdout
