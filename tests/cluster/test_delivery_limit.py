"""What happens at a quorum queue's delivery limit (codec.DELIVERY_LIMIT).

A message taken and returned unacknowledged (its worker died) more often
than the limit is dead-lettered to ``<queue>.XQ`` with reason
``delivery_limit``; ``issuance dead-letters drain`` then moves it into the
dead-letter store. Quorum queues work on one node too: this runs on the
shared RabbitMQ, in a vhost of its own (a queue keeps its type, and the
session's vhost holds classic ones).
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from issuance.shared.settings import Settings
from issuance.shared.wire import amqp, codec
from issuance.shared.wire.publisher import RabbitPublisher

from tests.conftest import RABBIT_HOST, _rabbitmqctl, claim


@pytest.fixture
def quorum(settings: Settings) -> Iterator[Settings]:
    vhost = f"issuance_q_{secrets.token_hex(4)}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield dataclasses.replace(
        settings, queue_type="quorum", amqp_url=f"amqp://guest:guest@{RABBIT_HOST}/{vhost}"
    )
    _rabbitmqctl("delete_vhost", vhost)


def take_and_drop(settings: Settings, queue: str) -> bool:
    """Take one message and close the connection without acknowledging it,
    as a worker killed mid-message does; False when the queue was empty."""
    connection = amqp.connect(settings.amqp_url)
    try:
        method, _, _ = connection.channel().basic_get(queue, auto_ack=False)
        return method is not None
    finally:
        connection.close()


def depth(settings: Settings, queue: str) -> int:
    connection = amqp.connect(settings.amqp_url)
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


def test_a_message_returned_past_the_limit_is_dead_lettered_and_drained(quorum: Settings, pool: Any) -> None:
    from issuance.shared.db.dead_letters import drain

    with RabbitPublisher.from_settings(quorum) as publisher:
        publisher.publish(claim("any-activity"))
    returns = 0
    while take_and_drop(quorum, "claims"):
        returns += 1
        assert returns <= codec.DELIVERY_LIMIT + 1, "the delivery limit did not stop the returns"
    # Dead-lettering at-least-once completes asynchronously.
    deadline = time.monotonic() + 10
    while depth(quorum, "claims.XQ") == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert returns == codec.DELIVERY_LIMIT + 1
    assert depth(quorum, "claims.XQ") == 1

    assert drain(quorum, pool) == 1
    with psycopg.connect(quorum.database_url) as conn:
        rows = conn.execute("SELECT queue, actor, reason, detail FROM dead_letters").fetchall()
    assert [(q, a, r) for q, a, r, _ in rows] == [("claims", "claim_requested", "rejected")]
    assert rows[0][3] == "rejected by the broker (delivery_limit)"
