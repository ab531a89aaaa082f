"""No accepted claim vanishes: the broker refusing a retry copy, on real
RabbitMQ and PostgreSQL with the workers as a subprocess."""

from __future__ import annotations

import subprocess
import time
import urllib.parse
from collections.abc import Iterator

import psycopg
import pytest
from issuance.shared.settings import Settings
from issuance.shared.wire.publisher import RabbitPublisher

from tests.conftest import claim, make_activity, verify_clean
from tests.e2e.conftest import claim_states, wait_for
from tests.e2e.test_cli import issuance

REFUSE_DQ = "issuance-test-refuse-claims-dq"
REFUSE_CREDITS = "issuance-test-refuse-credits"


def _vhost(settings: Settings) -> str:
    return urllib.parse.unquote(urllib.parse.urlparse(settings.amqp_url).path[1:])


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def _refuse_publishes(settings: Settings, name: str, pattern: str) -> None:
    _rabbitmqctl(
        "set_policy",
        "-p",
        _vhost(settings),
        "--apply-to",
        "queues",
        name,
        pattern,
        '{"max-length":0,"overflow":"reject-publish"}',
    )


def _accept_publishes(settings: Settings, name: str) -> None:
    subprocess.run(
        ["rabbitmqctl", "-q", "clear_policy", "-p", _vhost(settings), name],
        capture_output=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def refuse_retry_copies(settings: Settings) -> Iterator[None]:
    """RabbitMQ refuses every publish to claims.DQ, where retry copies go."""
    _refuse_publishes(settings, REFUSE_DQ, r"^claims\.DQ$")
    yield
    _accept_publishes(settings, REFUSE_DQ)


def _sessions_waiting_on_a_lock(settings: Settings) -> int:
    # Asked from a fresh session: inside a transaction pg_stat_activity is a snapshot.
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
    return int(row[0]) if row else 0


def test_a_claim_whose_retry_copy_is_refused_goes_back_to_its_queue(
    settings, start_workers, refuse_retry_copies, tmp_path
):
    act = make_activity(settings, budget=40, codes=40)
    start_workers(processes=1, threads=4, queues=["claims"])
    messages = [claim(act["slug"]) for _ in range(20)]
    with psycopg.connect(settings.database_url, autocommit=True) as blocker:
        # Claims in flight wait on this lock; then their database sessions are
        # cut: an outage, which Retries answers by publishing a retry copy
        # to claims.DQ, which the policy refuses.
        blocker.execute("BEGIN")
        blocker.execute("LOCK TABLE claims IN EXCLUSIVE MODE")
        with RabbitPublisher.from_settings(settings) as publisher:
            publisher.publish_many(messages)
        wait_for(
            lambda: _sessions_waiting_on_a_lock(settings) > 0, what="a claim transaction waiting on the lock"
        )
        blocker.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        log = tmp_path / "workers.log"
        wait_for(
            lambda: "after_process_message" in log.read_text() or "not confirmed" in log.read_text(),
            what="a retry copy refused",
        )
        blocker.execute("ROLLBACK")
    # Every claim is decided in the end: none was acknowledged without effect.
    deadline = time.monotonic() + 60
    while claim_states(settings).get("credited") != len(messages) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert claim_states(settings) == {"credited": len(messages)}, "claims lost with their retry copy"
    report = verify_clean(settings)
    assert report["counts"]["claims"] == len(messages)
    assert report["counts"]["dead_letters"] == 0, "a refused retry copy is not a poisoned message"


def _stuck_bound_claim(settings, two_step, pool) -> None:
    """A claim bound and never credited, as when its credit message was lost,
    decided 11 minutes ago."""
    from issuance.workers.handlers import handle_claim

    act = make_activity(settings)
    handle_claim(pool, two_step, claim(act["slug"]))
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute("UPDATE claims SET decided_at = now() - interval '11 minutes'")


def test_a_bound_claim_whose_credit_was_lost_is_a_breach_until_the_sweep(
    settings, two_step, service_env, pool, start_workers
):
    _stuck_bound_claim(settings, two_step, pool)
    stuck = issuance("verify", env=service_env)
    assert stuck.returncode == 1, stuck.stdout + stuck.stderr
    assert "BREACH bound_uncredited_past_grace: 1" in stuck.stdout
    assert "uncredited_past_deadline" not in stuck.stdout, "hours before the 24-hour deadline"
    longer = issuance("verify", env={**service_env, "ISSUANCE_RECONCILE_GRACE_SECONDS": "3600"})
    assert longer.returncode == 0, "the grace period is a setting"

    swept = issuance("sweep", env=service_env)
    assert swept.returncode == 0 and "re-sent: 1" in swept.stdout, swept.stdout + swept.stderr
    start_workers(queues=["credits"])
    wait_for(lambda: claim_states(settings) == {"credited": 1}, what="the re-driven claim credited")
    clean = issuance("verify", env=service_env)
    assert clean.returncode == 0, clean.stdout


def test_the_workers_run_the_sweeper_without_being_asked(
    settings, two_step, service_env, pool, start_workers
):
    _stuck_bound_claim(settings, two_step, pool)
    start_workers(queues=["claims", "credits"])
    wait_for(lambda: claim_states(settings) == {"credited": 1}, what="the sweeper forked by the workers")
    verify_clean(settings)


def test_a_claim_whose_credit_and_retry_copy_are_refused_is_not_left_bound(
    settings, start_workers, refuse_retry_copies
):
    """With the credit step apart, the credit publish after the commit is
    refused and so is the retry copy: the claim delivery goes back to its
    queue until the broker takes the credit again."""
    act = make_activity(settings, budget=20, codes=20)
    _refuse_publishes(settings, REFUSE_CREDITS, r"^credits$")
    try:
        start_workers(processes=1, threads=4, queues=["claims", "credits"], ISSUANCE_CREDIT_INLINE="false")
        messages = [claim(act["slug"]) for _ in range(10)]
        with RabbitPublisher.from_settings(settings) as publisher:
            publisher.publish_many(messages)
        # The first batch commits, then its credit publish and retry copies are refused.
        wait_for(lambda: claim_states(settings).get("bound", 0) >= 4, what="claims bound")
        time.sleep(2)
    finally:
        _accept_publishes(settings, REFUSE_CREDITS)
    wait_for(
        lambda: claim_states(settings) == {"credited": len(messages)}, timeout=60, what="every claim credited"
    )
    verify_clean(settings)
