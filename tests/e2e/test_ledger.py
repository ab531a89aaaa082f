"""The acceptance ledger closes the loop: a claim the broker accepted and
lost before any worker recorded it (its ``claims`` queue copy purged) is a
breach of ``issuance verify`` past the grace period, and the sweeper
re-publishes it from the ledger until it is recorded, exactly once."""

from __future__ import annotations

import time

import pika
import psycopg
from issuance.shared.settings import Settings
from issuance.shared.wire.publisher import RabbitPublisher

from tests.conftest import claim, make_activity, verify_clean
from tests.e2e.conftest import claim_states, wait_for
from tests.e2e.test_cli import issuance

GRACE = {"ISSUANCE_RECONCILE_GRACE_SECONDS": "2"}


def _lose_queued_claims(settings: Settings) -> int:
    """Purge the ``claims`` queue: the copies the workers would have taken."""
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        return int(connection.channel().queue_purge("claims").method.message_count)
    finally:
        connection.close()


def _publish_and_lose(settings: Settings) -> list[str]:
    """One claim alone, a batch of two, and one for an activity that does not
    exist (refused when it is decided: recorded all the same); every
    queue copy lost. Returns the claim IDs."""
    act = make_activity(settings)
    single, batch = claim(act["slug"]), [claim(act["slug"]) for _ in range(2)]
    unknown = claim("no-such-activity")
    with RabbitPublisher.from_settings(settings) as publisher:
        publisher.publish_many([single, unknown])
        publisher.publish_claims(batch)
    assert _lose_queued_claims(settings) == 3, "three envelopes were queued"
    return [str(c.claim_id) for c in (single, unknown, *batch)]


def _credits_per_claim(settings: Settings) -> dict[str, int]:
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute("SELECT claim_id, count(*) FROM wallet_ledger GROUP BY claim_id").fetchall()
    return {str(claim_id): int(n) for claim_id, n in rows}


def test_a_claim_lost_before_its_first_row_fails_verify_until_the_sweeper_redrives_it(
    settings, service_env, start_workers
):
    claim_ids = _publish_and_lose(settings)
    env = {**service_env, **GRACE}
    time.sleep(2.5)  # past the grace period
    lost = issuance("verify", env=env)
    assert lost.returncode == 1, lost.stdout + lost.stderr
    assert "BREACH accepted_unrecorded: 4" in lost.stdout, lost.stdout
    assert claim_ids[0] in lost.stdout, "verify names the lost claims"
    assert "3 not recorded" in lost.stdout, "three envelopes, one of them a batch"
    later = issuance("verify", env=service_env)
    assert later.returncode == 0, "inside the default grace period, a claim may still be on its way"

    swept = issuance("sweep", env=env)
    assert swept.returncode == 0, swept.stdout + swept.stderr
    assert "accepted, not recorded: 3 envelopes, re-published: 3" in swept.stdout, swept.stdout
    # The sweeper's own grace here is 1 s: a second pass re-publishes again,
    # and the workers absorb the duplicates.
    again = issuance("sweep", env=env)
    assert again.returncode == 0 and "accepted, not recorded: 3 envelopes" in again.stdout, again.stdout

    start_workers(queues=["claims", "credits"])
    wait_for(lambda: claim_states(settings) == {"credited": 3, "refused": 1}, what="the re-driven claims")
    clean = issuance("verify", env=env)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "0 not recorded" in clean.stdout, clean.stdout
    credits = _credits_per_claim(settings)
    assert sorted(credits) == sorted(claim_ids[:1] + claim_ids[2:]) and set(credits.values()) == {1}
    verify_clean(settings)
    # Settled: the checkpoint moved past all four envelopes' entries.
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute("SELECT next_offset FROM ledger_checkpoints").fetchone()
    assert row == (3,)
    settled = issuance("sweep", env=env)
    assert "accepted, not recorded: 0 envelopes" in settled.stdout, settled.stdout


def test_the_workers_redrive_a_lost_claim_without_being_asked(settings, service_env, start_workers):
    claim_ids = _publish_and_lose(settings)
    time.sleep(2.5)
    # The sweeper forked by the workers re-publishes at its first pass.
    start_workers(queues=["claims", "credits"], **GRACE)
    wait_for(lambda: claim_states(settings) == {"credited": 3, "refused": 1}, what="the sweeper fork")
    assert set(_credits_per_claim(settings)) == {claim_ids[0], *claim_ids[2:]}
    clean = issuance("verify", env={**service_env, **GRACE})
    assert clean.returncode == 0, clean.stdout + clean.stderr


def test_the_ledger_holds_what_producers_published_and_not_the_redrive(settings):
    from issuance.shared.wire.ledger import now_ms, read

    first, second = claim("spring"), claim("spring")
    with RabbitPublisher.from_settings(settings) as publisher:
        publisher.publish(first)
    with RabbitPublisher.from_settings(settings, ledger=False) as redrive:
        redrive.publish(second)
    entries = list(read(settings.amqp_url, None, until_ms=now_ms() + 60_000, idle=0.5))
    assert [[u.claim_id for u in e.units] for e in entries] == [[first.claim_id]]
    assert _lose_queued_claims(settings) == 2, "both reached the claims queue"


def test_without_a_ledger_verify_says_so_and_passes(settings, service_env):
    """As in a vhost the deploy definitions were not loaded into."""
    result = issuance("verify", env=service_env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ledger: absent (no claims.accepted stream in this vhost)" in result.stdout


def test_a_ledger_declared_anew_is_read_from_its_start_not_from_the_old_checkpoint(
    settings, service_env, pool
):
    """Deleting the stream (to change its arguments, say) starts its offsets
    at 0 again: a checkpoint past its end must not hide the new entries."""
    from issuance.workers.handlers import handle_claim

    act = make_activity(settings)
    decided = [claim(act["slug"]) for _ in range(3)]
    with RabbitPublisher.from_settings(settings) as publisher:
        publisher.publish_many(decided)
    for message in decided:
        handle_claim(pool, settings, message)
    _lose_queued_claims(settings)  # recorded already: nothing is lost
    env = {**service_env, **GRACE}
    time.sleep(2.5)
    first = issuance("verify", env=env)
    assert first.returncode == 0 and "checkpoint now 3" in first.stdout, first.stdout + first.stderr

    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        connection.channel().queue_delete("claims.accepted")
    finally:
        connection.close()
    lost = claim(act["slug"])
    with RabbitPublisher.from_settings(settings) as publisher:
        publisher.publish(lost)
    assert _lose_queued_claims(settings) == 1
    time.sleep(2.5)
    again = issuance("verify", env=env)
    assert again.returncode == 1, again.stdout + again.stderr
    assert str(lost.claim_id) in again.stdout and "read again from the first" in again.stdout
