"""`issuance chart`: claims, credits, backlog and latency from PostgreSQL to a PNG."""

from __future__ import annotations

import psycopg
from issuance.shared.backoffice.charts import load_series
from issuance.shared.cli import main
from issuance.workers.handlers import handle_claim, handle_credit
from issuance.workers.sweeper import credit_messages

from tests.conftest import claim, make_activity

PNG = b"\x89PNG\r\n\x1a\n"


def test_a_chart_of_an_activity_with_a_backlog(settings, two_step, pool, service_env, monkeypatch, tmp_path):
    act = make_activity(settings, budget=30, codes=30)
    outcomes = [handle_claim(pool, two_step, claim(act["slug"])) for _ in range(20)]
    for message in credit_messages([o.claim_id for o in outcomes[:15]]):
        handle_credit(pool, message)

    with psycopg.connect(settings.database_url) as conn:
        series = load_series(conn, activity=act["slug"])
        everything = load_series(conn)
    assert series.claimed[-1] == 20
    assert series.credited[-1] == 15
    assert series.backlog[-1] == 5
    assert all(0 <= p50 <= p99 for p50, p99 in zip(series.p50, series.p99, strict=True))
    assert everything.claimed[-1] == 20

    for name, value in service_env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "chart.png"
    assert main(["chart", "--activity", act["slug"], "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(PNG)
    assert len(data) > 20_000
    assert main(["chart", "--activity", "no-such-activity", "--out", str(tmp_path / "none.png")]) == 1
