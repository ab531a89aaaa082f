"""A smoke run of the cluster benchmark (benchmarks/cluster.py), so it keeps working."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.timeout(900)
def test_the_cluster_benchmark_runs_and_reports_ratios(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISSUANCE_")}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.cluster", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (report,) = tmp_path.glob("cluster-*.json")
    results = json.loads(report.read_text())
    assert results["verify"]["clean"]
    assert [t["target"] for t in results["targets"]] == [
        "classic, 1 node",
        "quorum, 1 node",
        "quorum, 3 nodes",
    ]
    assert all(t[phase]["per_s"] > 0 for t in results["targets"] for phase in ("publish", "drain"))
    kill = results["kill"]
    assert kill["killed"].endswith("@localhost") and kill["overall_per_s"] > 0
    assert set(results["ratios_to_classic_single_node"]) == {
        "quorum, 1 node",
        "quorum, 3 nodes",
        "quorum, 3 nodes, claims leader SIGKILLed",
    }
    assert len(results["load_at_start"]) == 3
    assert "/ classic, 1 node" in result.stdout
