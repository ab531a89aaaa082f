"""Multi-process metrics: the directory is wiped only when no live process
owns it; dead processes' live gauges are dropped; the ASGI app answers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from issuance.shared import metrics
from issuance.workers import instruments
from issuance.workers.exporter import _divide, _rate
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).parents[2]


def dead_pid() -> int:
    code = "import os; print(os.getpid())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_a_directory_left_by_dead_processes_is_wiped(tmp_path):
    gone = dead_pid()
    (tmp_path / f"counter_{gone}.db").write_bytes(b"stale")
    (tmp_path / f"process_{gone}.pid").touch()
    assert metrics.prepare_multiprocess_dir(tmp_path, pid=12345678) is True
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "process_12345678.pid"
    ]


def test_a_directory_with_a_live_sibling_is_kept(tmp_path):
    (tmp_path / f"counter_{os.getpid()}.db").write_bytes(b"live")
    assert metrics.prepare_multiprocess_dir(tmp_path, pid=12345678) is False
    assert (tmp_path / f"counter_{os.getpid()}.db").read_bytes() == b"live"


CHILD = "; ".join(
    [
        "from issuance.workers.instruments import CREDITS, CONSUMERS",
        "CREDITS.inc(2)",
        "CONSUMERS.labels('claims').inc()",
    ]
)
# The server plays the workers' metrics fork, which has the workers'
# instruments loaded like every process Dramatiq forks.
PARENT = f"""
import subprocess, sys
from issuance.shared.metrics import metrics_response
import issuance.workers.instruments
for _ in range(2):
    subprocess.run([sys.executable, "-c", {CHILD!r}], check=True)
sys.stdout.write(metrics_response()[0].decode())
"""


def test_processes_add_up_and_a_killed_process_stops_counting_in_live_gauges(tmp_path):
    # A server process (the parent, alive throughout) and two workers that
    # count and die without marking themselves dead.
    (tmp_path / f"counter_{dead_pid()}.db").write_bytes(b"left by a run long gone")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", PARENT], env=env, cwd=ROOT, check=True, capture_output=True, text=True
    )
    values = {
        s.name + str(sorted(s.labels.items())): s.value
        for f in text_string_to_metric_families(out.stdout)
        for s in f.samples
    }
    assert values["issuance_credits_total[]"] == 4
    # Their live gauges were dropped by the scrape, their counters kept.
    assert values.get("issuance_worker_consumers[('queue', 'claims')]", 0) == 0
    assert len(list(tmp_path.glob("gauge_livesum_*.db"))) == 1, "only the live server's own"
    assert len(list(tmp_path.glob("counter_*.db"))) == 3, "the two workers' and the server's"


def test_the_asgi_app_serves_the_exposition_format():
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    instruments.CODES_BOUND.inc(0)
    asyncio.run(metrics.asgi_app()({"type": "http", "path": "/metrics"}, receive, send))
    assert sent[0]["status"] == 200
    body = sent[1]["body"]
    assert isinstance(body, bytes)
    assert b"issuance_codes_bound_total" in body


def test_rates_and_forecasts():
    class R:
        def __init__(self, at: float, n: int) -> None:
            self.at, self.n = at, n

    history = [R(0, 10), R(60, 40), R(120, 70)]
    rates = _rate(history, history[-1], lambda r: {"a": r.n}, window=900)  # type: ignore[arg-type]
    assert rates == {"a": 0.5}
    assert _rate(history[:1], history[0], lambda r: {"a": r.n}, window=900) == {}  # type: ignore[arg-type]
    assert _divide(100, 0.5) == 200
    assert _divide(100, 0.0) == float("inf")
    assert _divide(0, 0.0) == 0
    assert _divide(5, None) != _divide(5, None)  # NaN: unknown until two readings


def test_the_page_exports_only_its_own_metrics():
    """The page used to export every worker metric at 0 (its /metrics read
    like a worker that had done nothing)."""
    code = (
        "import issuance.producers.web.app\n"
        "from issuance.shared.metrics import metrics_response\n"
        "print(metrics_response()[0].decode())"
    )
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, check=True, capture_output=True, text=True
    )
    families = {f.name for f in text_string_to_metric_families(out.stdout) if f.name.startswith("issuance_")}
    assert families, "the page's own metrics are there"
    assert all(name.startswith("issuance_web_") for name in families), families


def test_a_cell_worker_group_labels_its_target_with_its_cell(tmp_path):
    import json

    from issuance.workers.metrics import announce

    plain = announce(tmp_path, "claims", 9191, "127.0.0.1")
    a = announce(tmp_path, "claims", 9193, "127.0.0.1", cell="a")
    b = announce(tmp_path, "claims", 9194, "127.0.0.1", cell="b")
    assert json.loads(plain.read_text()) == [{"targets": ["127.0.0.1:9191"], "labels": {"group": "claims"}}]
    # Two cells' groups of one name on one host: a file each, each with its cell.
    assert len({plain, a, b}) == 3
    assert json.loads(b.read_text())[0]["labels"] == {"group": "claims", "cell": "b"}
