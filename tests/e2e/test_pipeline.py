"""The whole pipeline on real RabbitMQ, PostgreSQL and Redis, with the
workers as subprocesses: duplicates, bad input, crashes and redelivery."""

from __future__ import annotations

import uuid

import orjson
import pika
import psycopg
import pytest
from issuance.shared.wire.codec import envelope, queue_arguments
from issuance.shared.wire.messages import ClaimRequested, OrderPlaced, ShareOpened, utcnow
from issuance.shared.wire.publisher import RabbitPublisher

from tests.conftest import claim, make_activity, verify_clean
from tests.e2e.conftest import claim_states, consumers, wait_for


def _all_decided(settings, expected: int, credited: int | None = None):
    def check():
        states = claim_states(settings)
        done = sum(states.values()) == expected and not states.get("bound")
        return done and (credited is None or states.get("credited", 0) == credited)

    return check


def test_claims_with_duplicates_and_bad_numbers_end_credited_exactly_once(settings, start_workers):
    act = make_activity(settings, budget=150, codes=200, templates=2)
    claims = [claim(act["slug"]) for _ in range(150)]
    claims += [claim(act["slug"], "12345") for _ in range(5)]  # bad numbers
    messages = claims + claims[:20]  # re-sends of the same claims
    start_workers(processes=2, threads=4)
    with RabbitPublisher.from_settings(settings) as publisher:
        assert publisher.publish_many(messages) == len(messages)
    wait_for(_all_decided(settings, 155, credited=150), timeout=120, what="every claim decided and credited")
    report = verify_clean(settings)
    assert report["counts"]["credits"] == 300
    assert report["refused_by_reason"] == {"bad_phone": 5}


def test_orders_open_shares_and_opens_are_recorded_once(settings, start_workers):
    make_activity(settings, slug="spring-sale")
    order = OrderPlaced(
        order_id="SO-1", member_id=42, amount_cents=100, placed_at=utcnow(), activity="spring-sale"
    )
    from issuance.shared.domain import share_id_for

    opened = ShareOpened(event_id=uuid.uuid4(), share_id=share_id_for("SO-1"), opened_at=utcnow())
    start_workers(queues=["orders", "shares"])
    with RabbitPublisher.from_settings(settings) as publisher:
        publisher.publish_many([order, order, opened, opened])

    def counted():
        with psycopg.connect(settings.database_url) as conn:
            return conn.execute(
                "SELECT (SELECT count(*) FROM shares), (SELECT count(*) FROM share_opens)"
            ).fetchone()

    assert wait_for(lambda: counted() == (1, 1) and counted(), what="share and open recorded") == (1, 1)


def _publish_raw(settings, queue: str, body: bytes) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = connection.channel()
    channel.queue_declare(queue, durable=True, arguments=queue_arguments(queue))
    channel.basic_publish(
        "", queue, body, pika.BasicProperties(delivery_mode=2, message_id=str(uuid.uuid4()))
    )
    connection.close()


def test_bad_messages_are_dead_lettered_with_a_reason_and_never_loop(settings, start_workers):
    from issuance.shared.db import database
    from issuance.shared.db.dead_letters import drain

    act = make_activity(settings)
    good = claim(act["slug"])
    invalid_payload = envelope(good)
    invalid_payload["args"] = [{**good.to_payload(), "claim_id": "not-a-uuid"}]
    unknown_version = envelope(good)
    unknown_version["args"] = [{**good.to_payload(), "v": 9}]
    start_workers(queues=["claims", "credits"])
    _publish_raw(settings, "claims", orjson.dumps(invalid_payload))
    _publish_raw(settings, "claims", orjson.dumps(unknown_version))
    _publish_raw(settings, "claims", b"\x00 definitely not an envelope")
    with RabbitPublisher.from_settings(settings) as publisher:
        publisher.publish(good)
    wait_for(_all_decided(settings, 1, credited=1), what="the good claim credited")

    def dead_letters():
        with database.pool(settings, max_size=1) as pool:
            drain(settings, pool)
        with psycopg.connect(settings.database_url) as conn:
            return dict(conn.execute("SELECT reason, count(*) FROM dead_letters GROUP BY reason").fetchall())

    found = wait_for(lambda: len(dead_letters()) == 3 and dead_letters(), what="three dead letters")
    assert found == {"bad_field": 1, "unknown_version": 1, "undecodable_envelope": 1}
    with psycopg.connect(settings.database_url) as conn:
        bodies = [r[0] for r in conn.execute("SELECT body FROM dead_letters").fetchall()]
    assert not any(good.phone in body for body in bodies), "no phone number in clear in the store"
    verify_clean(settings)


@pytest.mark.parametrize("fault", ["after_commit_before_ack", "after_commit_before_publish"])
def test_a_worker_killed_after_commit_loses_nothing_and_doubles_nothing(
    settings, start_workers, tmp_path, fault
):
    act = make_activity(settings, budget=50, codes=50)
    trigger = tmp_path / "crash-once"
    trigger.touch()
    # The publish of a credit message happens only with the separate credit step.
    inline = "false" if fault == "after_commit_before_publish" else "true"
    doomed = start_workers(
        queues=["claims"],
        ISSUANCE_FAULT=fault,
        ISSUANCE_FAULT_TRIGGER=str(trigger),
        ISSUANCE_CREDIT_INLINE=inline,
    )
    messages = [claim(act["slug"]) for _ in range(20)]
    with RabbitPublisher.from_settings(settings) as publisher:
        publisher.publish_many(messages)
    doomed.proc.wait(timeout=60)  # the crash point SIGKILLs a worker; Dramatiq stops the rest
    assert not trigger.exists(), "the crash point fired"
    assert consumers(settings, "claims") == 0
    # The unacknowledged claim comes back to the next worker, which finds it
    # already recorded (and credited, or bound: then it sends its credit again).
    start_workers(queues=["claims", "credits"])
    wait_for(
        _all_decided(settings, 20, credited=20), timeout=120, what="all 20 claims credited after the crash"
    )
    report = verify_clean(settings)
    assert report["counts"]["credits"] == 20
    # Dramatiq's supervisor exits non-zero when a worker process is killed
    # (its log line about it is not always flushed before it exits).
    assert doomed.proc.returncode != 0


def test_a_broker_side_redelivery_after_a_lost_ack_is_absorbed(settings, start_workers):
    """Deliver the same claim again after it was fully handled: what RabbitMQ
    does when an ack is lost with its connection."""
    act = make_activity(settings)
    message = claim(act["slug"])
    # One thread: deliveries are handled in order, so once the sentinel
    # claim is credited the re-deliveries before it have been handled too.
    start_workers(threads=1, queues=["claims", "credits"])
    with RabbitPublisher.from_settings(settings) as publisher:
        publisher.publish(message)
        wait_for(_all_decided(settings, 1, credited=1), what="first delivery credited")
        publisher.publish(message)
        publisher.publish(ClaimRequested.from_payload(orjson.loads(orjson.dumps(message.to_payload()))))
        publisher.publish(claim(act["slug"]))
    wait_for(_all_decided(settings, 2, credited=2), what="the sentinel claim credited")
    report = verify_clean(settings)
    assert report["counts"]["credits"] == 2 and report["counts"]["claims"] == 2


def test_with_redis_down_the_workers_go_on(settings, start_workers):
    act = make_activity(settings, budget=50, codes=50)
    start_workers(queues=["claims", "credits"], ISSUANCE_REDIS_URL="redis://127.0.0.1:1/0")
    with RabbitPublisher.from_settings(settings) as publisher:
        publisher.publish_claims([claim(act["slug"]) for _ in range(30)], batch=10)
    wait_for(_all_decided(settings, 30, credited=30), timeout=60, what="claims credited without Redis")
    verify_clean(settings)


def test_a_bad_item_in_a_claim_batch_is_dead_lettered_alone(settings, start_workers):
    from issuance.shared.wire.messages import ClaimsRequested

    act = make_activity(settings)
    good = [claim(act["slug"]) for _ in range(3)]
    batch = ClaimsRequested(batch_id=uuid.uuid4(), claims=tuple(good))
    body = envelope(batch)
    body["args"][0]["claims"].insert(1, {"v": 1, "claim_id": "broken", "phone": good[0].phone})
    start_workers(queues=["claims", "credits"])
    _publish_raw(settings, "claims", orjson.dumps(body))
    wait_for(_all_decided(settings, 3, credited=3), what="the good claims of the batch credited")
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute("SELECT reason, detail, body FROM dead_letters").fetchall()
    assert len(rows) == 1
    reason, detail, stored = rows[0]
    assert reason == "bad_field" and "claim 1 of batch" in detail
    assert good[0].phone not in stored, "the stored item is redacted"
    verify_clean(settings)
