"""The unit of work (issuance.workers.runtime.UnitOfWork) against real
PostgreSQL: follow-up messages leave after the commit, never without it."""

from __future__ import annotations

import uuid
from typing import Any

import dramatiq
import psycopg
import pytest
from dramatiq.brokers.stub import StubBroker
from issuance.shared.errors import TransientError
from issuance.shared.wire.messages import CreditRequested
from issuance.workers.runtime import UnitOfWork


class Recording(StubBroker):
    """A broker that notes, for each message sent, whether the marker row
    was already visible to another connection (committed) at that moment."""

    def __init__(self, dsn: str, marker: uuid.UUID) -> None:
        super().__init__()
        self.dsn, self.marker = dsn, marker
        self.sent: list[tuple[Any, bool]] = []

    def enqueue(self, message: Any, *, delay: int | None = None) -> Any:
        with psycopg.connect(self.dsn) as conn:
            visible = conn.execute("SELECT 1 FROM share_opens WHERE event_id = %s", (self.marker,)).fetchone()
        self.sent.append((message, visible is not None))
        return message


@pytest.fixture
def broker_and_actor(settings):
    marker = uuid.uuid4()
    broker = Recording(settings.database_url, marker)
    actor = dramatiq.actor(
        lambda payload: None, actor_name="follow_up", queue_name="follow-ups", broker=broker
    )
    return broker, actor, marker


def mark(conn: Any, marker: uuid.UUID) -> None:
    # A share_opens row needs no other row: a cheap, visible marker.
    conn.execute(
        "INSERT INTO share_opens (event_id, share_id, opened_at) VALUES (%s, %s, now())",
        (marker, uuid.uuid4()),
    )


def follow_up() -> CreditRequested:
    return CreditRequested(claim_ids=(uuid.uuid4(),))


def test_follow_ups_leave_after_the_commit(pool, settings, broker_and_actor):
    broker, actor, marker = broker_and_actor
    uow = UnitOfWork(pool, settings)

    def work(conn: Any) -> str:
        mark(conn, marker)
        uow.send_after_commit(actor, follow_up())
        assert broker.sent == [], "nothing leaves before the commit"
        return "done"

    assert uow.run(work) == "done"
    assert [visible for _, visible in broker.sent] == [True]


def test_no_follow_up_leaves_when_the_transaction_rolls_back(pool, settings, broker_and_actor):
    broker, actor, marker = broker_and_actor
    uow = UnitOfWork(pool, settings)

    def work(conn: Any) -> None:
        mark(conn, marker)
        uow.send_after_commit(actor, follow_up())
        raise ValueError("the handler failed")

    with pytest.raises(ValueError, match="the handler failed"):
        uow.run(work)
    assert broker.sent == []
    with pool.connection() as conn:
        assert conn.execute("SELECT 1 FROM share_opens WHERE event_id = %s", (marker,)).fetchone() is None


def test_a_retried_transaction_sends_the_follow_ups_of_its_last_attempt_only(
    pool, settings, broker_and_actor
):
    broker, actor, marker = broker_and_actor
    uow = UnitOfWork(pool, settings)
    attempts = []

    def work(conn: Any) -> None:
        attempts.append(1)
        uow.send_after_commit(actor, follow_up())
        if len(attempts) < 3:
            raise psycopg.errors.DeadlockDetected("collided")
        mark(conn, marker)

    uow.run(work, retry_on=(psycopg.errors.DeadlockDetected,), attempts=5)
    assert len(attempts) == 3
    assert [visible for _, visible in broker.sent] == [True]


def test_a_transaction_that_keeps_colliding_is_transient_and_sends_nothing(pool, settings, broker_and_actor):
    broker, actor, _ = broker_and_actor
    uow = UnitOfWork(pool, settings)

    def work(conn: Any) -> None:
        uow.send_after_commit(actor, follow_up())
        raise psycopg.errors.DeadlockDetected("collided")

    with pytest.raises(TransientError):
        uow.run(work, retry_on=(psycopg.errors.DeadlockDetected,), attempts=2)
    assert broker.sent == []
