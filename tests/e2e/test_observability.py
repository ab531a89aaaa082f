"""Metrics scraped over HTTP from the real workers (a dramatiq process tree)
and the real exporter, checked against what PostgreSQL says; the promise
tracked while the credit step is stopped, then drained when it resumes."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from issuance.shared.settings import Settings
from issuance.shared.wire.publisher import RabbitPublisher
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import claim, make_activity, verify_clean
from tests.e2e.conftest import ROOT, claim_states, wait_for

RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert found, f"{name}{labels} not exported"
    return sum(found)


def value_or_zero(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def db(settings: Settings, sql: str, *params: Any) -> Any:
    with psycopg.connect(settings.database_url) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.fixture
def start_exporter(service_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[[], int]]:
    started: list[subprocess.Popen[bytes]] = []

    def start() -> int:
        port = free_port()
        env = {**os.environ, **service_env}
        log = (tmp_path / "exporter.log").open("ab")
        argv = [
            sys.executable,
            "-m",
            "issuance.shared.cli",
            "exporter",
            "--port",
            str(port),
            "--interval",
            "0.5",
        ]
        argv += ["--campaign-interval", "0.5"]
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        started.append(proc)
        wait_for(lambda: _serving(port, proc), timeout=30, what="the exporter to serve")
        return port

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(timeout=30)


def _serving(port: int, proc: subprocess.Popen[bytes]) -> bool:
    assert proc.poll() is None, "the exporter exited"
    try:
        return any(name == "issuance_promise_uncredited_claims" for name, _ in scrape(port))
    except OSError:
        return False


def metrics_env(tmp_path: Path) -> dict[str, str]:
    return {
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
        "ISSUANCE_METRICS_PORT": str(free_port()),
        "ISSUANCE_METRICS_TARGETS_DIR": str(tmp_path / "targets"),
    }


def announced(env: dict[str, str], group: str) -> Samples | None:
    """A scrape of the port a worker group announced (its configured one,
    or a free one if that was still held, e.g. by a group just stopped);
    None while it is not serving yet."""
    path = Path(env["ISSUANCE_METRICS_TARGETS_DIR"]) / f"{group}.json"
    try:
        (target,) = json.loads(path.read_text())[0]["targets"]
        return scrape(int(target.rpartition(":")[2]))
    except (OSError, ValueError):
        return None


def leave_stale_values(directory: str, service_env: dict[str, str]) -> None:
    """A previous run that counted 1000 credits and exited."""
    code = "from issuance.workers.instruments import CREDITS; CREDITS.inc(1000)"
    env = {**os.environ, **service_env, "PROMETHEUS_MULTIPROC_DIR": directory}
    subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True, timeout=60)
    assert any(Path(directory).glob("counter_*.db"))


def test_scraped_metrics_match_the_database(settings, service_env, start_workers, start_exporter, tmp_path):
    act = make_activity(settings, budget=40, codes=60, templates=2)
    good = [claim(act["slug"]) for _ in range(45)]  # 5 more than the budget
    bad = [claim(act["slug"], "12345") for _ in range(3)]
    resent = good[:5]
    env = metrics_env(tmp_path)
    leave_stale_values(env["PROMETHEUS_MULTIPROC_DIR"], service_env)
    start_workers(processes=2, threads=4, **env)
    with RabbitPublisher.from_settings(settings) as publisher:
        publisher.publish_many(good + bad)
        publisher.publish_many(resent)
    wait_for(lambda: claim_states(settings).get("credited") == 40, timeout=120, what="40 claims credited")
    wait_for(lambda: sum(claim_states(settings).values()) == 48, timeout=60, what="every claim decided")
    verify_clean(settings)
    port = int(env["ISSUANCE_METRICS_PORT"])

    def settled() -> Samples | None:
        try:
            s = scrape(port)
        except OSError:  # the exposition process is still starting
            return None
        handled = sum(
            value_or_zero(s, "issuance_messages_total", queue="claims", outcome=outcome)
            for outcome in ("ok", "duplicate")
        )
        return s if handled == 53 and value_or_zero(s, "issuance_messages_in_progress") == 0 else None

    workers = wait_for(settled, timeout=30, what="every claim delivery counted")

    ((wallet,),) = db(settings, "SELECT count(*) FROM wallet_ledger")
    ((codes_bound,),) = db(settings, "SELECT count(*) FROM codes WHERE member_id IS NOT NULL")
    refused = dict(db(settings, "SELECT reason, count(*) FROM claims WHERE status = 'refused' GROUP BY 1"))
    assert wallet == 80
    # One credit per claim; the 1000 of the previous run were wiped with its directory.
    assert value(workers, "issuance_credits_total") == 40
    assert value(workers, "issuance_codes_bound_total") == codes_bound
    assert value(workers, "issuance_claims_total", outcome="bound") == 40
    for reason, count in refused.items():
        assert value(workers, "issuance_claims_total", outcome="refused", reason=reason) == count
    assert value(workers, "issuance_claims_total", outcome="refused") == sum(refused.values()) == 8
    assert value(workers, "issuance_duplicates_suppressed_total", queue="claims") == 5
    assert value(workers, "issuance_claim_to_credit_seconds_count") == 40
    assert value(workers, "issuance_claim_to_credit_seconds_bucket", le="+Inf") == 40
    assert value(workers, "issuance_queue_wait_seconds_count", queue="claims") == 53
    assert value(workers, "issuance_messages_total", queue="claims", outcome="duplicate") == 5
    assert value(workers, "issuance_promise_breaches_total") == 0
    # Two live worker processes, each consuming every queue with 4 threads.
    assert value(workers, "issuance_worker_consumers", queue="claims") == 2
    assert value(workers, "issuance_worker_consumers", queue="credits") == 2
    assert value(workers, "issuance_worker_threads") == 8

    exporter_port = start_exporter()
    exported = scrape(exporter_port)
    slug = act["slug"]
    assert value(exported, "issuance_activity_claims", activity=slug, status="credited") == 40
    assert value(exported, "issuance_activity_claims", activity=slug, status="refused") == 8
    assert value(exported, "issuance_activity_packages_remaining", activity=slug) == 0
    assert value(exported, "issuance_activity_collect_ratio", activity=slug) == 1.0
    assert value(exported, "issuance_activity_funnel", activity=slug, step="claims_requested") == 48
    assert value(exported, "issuance_activity_new_members", activity=slug) == 40
    available = dict(
        db(
            settings,
            "SELECT t.prefix, count(c.code) FILTER (WHERE c.status = 'available') FROM coupon_templates t"
            " JOIN codes c USING (template_id) GROUP BY t.prefix",
        )
    )
    for prefix, count in available.items():
        assert value(exported, "issuance_template_codes_available", template=prefix) == count == 20
    assert value(exported, "issuance_promise_uncredited_claims") == 0
    assert value(exported, "issuance_promise_drain_forecast_seconds") == 0
    assert value(exported, "issuance_queue_consumers", queue="claims") == 2
    assert value(exported, "issuance_queue_messages", queue="credits") == 0


def promtool_fires(samples: dict[str, float], alerts: dict[str, dict[str, str]], tmp_path: Path) -> None:
    """Hold the scraped values for 10 minutes and have promtool check that
    exactly ``alerts`` (name -> labels) fire on the project's rules."""
    rules = {
        rule["alert"]: rule
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
    }

    def series_value(v: float) -> str:
        return "Inf" if math.isinf(v) and v > 0 else ("-Inf" if math.isinf(v) else repr(v))

    series = []
    for key, v in samples.items():
        series.append({"series": key, "values": " ".join([series_value(v)] * 12)})
    cases = []
    for name in ("IssuancePromiseForecastBreach", "IssuancePromiseAtRiskNow", "IssuancePromiseBroken"):
        expected = []
        if name in alerts:
            annotations = {
                k: v.strip().replace("{{ $value }}", alerts[name].pop("$value", "")).replace("\n", " ")
                for k, v in rules[name]["annotations"].items()
            }
            labels = {**rules[name]["labels"], **alerts[name]}
            expected.append({"exp_labels": labels, "exp_annotations": annotations})
        cases.append({"eval_time": "10m", "alertname": name, "exp_alerts": expected})
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": cases}],
    }
    path = tmp_path / "promise_test.yml"
    path.write_text(yaml.safe_dump(test, width=1000))
    result = subprocess.run(
        ["promtool", "test", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


PROMISE_GAUGES = (
    "issuance_promise_uncredited_claims",
    "issuance_promise_drain_forecast_seconds",
    "issuance_promise_headroom_seconds",
    "issuance_promise_claims_overdue",
)


def promise_series(samples: Samples) -> dict[str, float]:
    out = {f'{name}{{job="issuance-exporter"}}': value(samples, name) for name in PROMISE_GAUGES}
    for window in ("1h", "6h"):
        out[f'issuance_promise_claims_at_risk{{job="issuance-exporter",window="{window}"}}'] = value(
            samples, "issuance_promise_claims_at_risk", window=window
        )
    return out


def sweep(service_env: dict[str, str], *args: str) -> str:
    env = {**os.environ, **service_env}
    argv = [sys.executable, "-m", "issuance.shared.cli", "sweep", *args]
    result = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_a_stopped_credit_step_puts_the_promise_at_risk_then_drains(
    settings, service_env, start_workers, start_exporter, tmp_path
):
    act = make_activity(settings, budget=50, codes=50)
    claims = [claim(act["slug"]) for _ in range(30)]
    env = metrics_env(tmp_path)
    # Their sweeper fork holds off for 36 hours: the one-pass sweeps below
    # are the only ones to re-send, whenever the fork's passes fall.
    claim_only = start_workers(
        processes=1,
        threads=4,
        queues=["claims"],
        ISSUANCE_CREDIT_INLINE="false",
        ISSUANCE_RECONCILE_GRACE_SECONDS=str(3 * 86_400),
        **env,
    )
    with RabbitPublisher.from_settings(settings) as publisher:
        publisher.publish_many(claims)
    wait_for(lambda: claim_states(settings).get("bound") == 30, timeout=60, what="30 claims bound")
    # Let the claims age: 29 of them are 23.5 hours old, one is 25 hours old.
    late = str(claims[0].claim_id)
    shift = "requested_at = requested_at - %s, deadline = deadline - %s, decided_at = decided_at - %s"
    with psycopg.connect(settings.database_url) as conn:
        conn.execute(
            f"UPDATE claims SET {shift} WHERE claim_id <> %s", (timedelta(hours=23.5),) * 3 + (late,)
        )
        conn.execute(f"UPDATE claims SET {shift} WHERE claim_id = %s", (timedelta(hours=25),) * 3 + (late,))

    exporter_port = start_exporter()

    at_risk = scrape(exporter_port)
    assert value(at_risk, "issuance_promise_credit_rate") == 0
    assert value(at_risk, "issuance_promise_uncredited_claims") == 30
    assert value(at_risk, "issuance_promise_claims_at_risk", window="1h") == 29
    assert value(at_risk, "issuance_promise_claims_at_risk", window="6h") == 29
    assert value(at_risk, "issuance_promise_claims_overdue") == 1
    assert value(at_risk, "issuance_promise_oldest_uncredited_age_seconds") >= 25 * 3600
    assert value(at_risk, "issuance_promise_headroom_seconds") < 0
    assert value(at_risk, "issuance_promise_drain_forecast_seconds") == math.inf
    assert value(at_risk, "issuance_activity_promise_breaches", activity=act["slug"]) == 1
    promtool_fires(
        promise_series(at_risk),
        {
            "IssuancePromiseForecastBreach": {"job": "issuance-exporter"},
            "IssuancePromiseAtRiskNow": {"job": "issuance-exporter", "window": "1h", "$value": "29"},
            "IssuancePromiseBroken": {"job": "issuance-exporter"},
        },
        tmp_path,
    )

    # The sweeper re-sends every aged credit once, then holds off.
    assert "overdue for credit: 30, re-sent: 30" in sweep(service_env, "--grace", "60")
    assert "overdue for credit: 30, re-sent: 0" in sweep(service_env, "--grace", "60")

    claim_only.stop()
    start_workers(processes=2, threads=4, **env)
    wait_for(lambda: claim_states(settings) == {"credited": 30}, timeout=120, what="the backlog credited")
    verify_clean(settings)

    def drained() -> Samples | None:
        s = scrape(exporter_port)
        credited = value(s, "issuance_activity_claims", activity=act["slug"], status="credited")
        return s if value(s, "issuance_promise_uncredited_claims") == 0 and credited == 30 else None

    after = wait_for(drained, timeout=30, what="the exporter to see the backlog drained")
    assert value(after, "issuance_promise_claims_at_risk", window="1h") == 0
    assert value(after, "issuance_promise_claims_overdue") == 0
    assert value(after, "issuance_promise_drain_forecast_seconds") == 0
    assert value(after, "issuance_promise_credit_rate") > 0
    assert value(after, "issuance_activity_claims", activity=act["slug"], status="credited") == 30
    assert value(after, "issuance_activity_promise_breaches", activity=act["slug"]) == 1
    promtool_fires(promise_series(after), {}, tmp_path)

    workers = wait_for(lambda: announced(env, "all"), timeout=30, what="the workers' metrics")
    # The one claim credited past its deadline is counted as a breach.
    assert value(workers, "issuance_promise_breaches_total") == 1
    assert value(workers, "issuance_claim_to_credit_seconds_bucket", le="86400.0") == 29
    assert value(workers, "issuance_claim_to_credit_seconds_count") == 30
