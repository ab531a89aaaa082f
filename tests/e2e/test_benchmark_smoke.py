"""A few seconds of the pipeline benchmark, so it keeps working."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_the_pipeline_benchmark_runs_and_reports_ratios(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISSUANCE_")}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.pipeline", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (report,) = tmp_path.glob("pipeline-*.json")
    results = json.loads(report.read_text())
    assert results["verify"]["clean"]
    assert all(v > 0 for v in results["ceilings"].values())
    assert results["pipeline_backlog"]["credited"] > 0
    assert results["latency"][0]["p99_ms"] is not None
    assert list(tmp_path.glob("pipeline-*.png"))
    assert "pipeline (drain) / this" in result.stdout


def test_the_cells_benchmark_runs_and_reports_the_overhead(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISSUANCE_")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.cells",
            "--claims",
            "600",
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (report,) = tmp_path.glob("cells-*.json")
    results = json.loads(report.read_text())
    assert [len(results["cells"][n]["per_cell"]) for n in ("2", "3")] == [2, 3]
    assert all(c["claims_per_s"] > 0 for n in ("2", "3") for c in results["cells"][n]["per_cell"])
    assert results["layer_over_direct"] > 0
    assert "Projection (arithmetic, not a measurement)" in result.stdout
