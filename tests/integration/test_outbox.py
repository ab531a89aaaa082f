"""The order system's side: the publisher API and the transactional outbox,
against the real PostgreSQL and RabbitMQ. An order never commits without its
event, nor the event without its order; a relay that dies before marking its
rows sent sends them again, and the duplicate is harmless."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pika
import psycopg
import pytest
from issuance.producers import outbox
from issuance.shared.settings import Settings
from issuance.shared.wire import codec
from issuance.shared.wire.messages import MESSAGE_TYPES, PUBLIC_TYPES, Message, OrderPlaced
from issuance.shared.wire.publisher import Publisher, RabbitPublisher

from tests.conftest import take_all
from tests.e2e.conftest import wait_for
from tests.integration.web_pipeline import purge, workers_running

PLACED_AT = datetime(2026, 11, 11, 0, 0, 5, tzinfo=UTC)


def order(n: int) -> OrderPlaced:
    return OrderPlaced(order_id=f"SO-outbox-{n}", member_id=1000 + n, amount_cents=2500, placed_at=PLACED_AT)


@pytest.fixture
def order_db(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    """The order system's tables, next to the outbox, in the test database."""
    purge(settings)
    with psycopg.connect(settings.database_url) as conn:
        with conn.transaction():
            conn.execute("DROP TABLE IF EXISTS orders_demo, issuance_outbox")
            conn.execute("CREATE TABLE orders_demo (order_id text PRIMARY KEY, amount_cents int NOT NULL)")
        outbox.install(conn)
        outbox.install(conn)  # idempotent
        yield conn
        conn.rollback()
        with conn.transaction():
            conn.execute("DROP TABLE IF EXISTS orders_demo, issuance_outbox")


def place_order(conn: psycopg.Connection[Any], event: OrderPlaced) -> None:
    """What the order system does: the order and its event in one transaction."""
    with conn.transaction():
        conn.execute(
            "INSERT INTO orders_demo (order_id, amount_cents) VALUES (%s, %s)",
            (event.order_id, event.amount_cents),
        )
        outbox.add(conn, event)


def queued(settings: Settings, queue: str = "orders") -> list[tuple[str, dict[str, Any]]]:
    """(message ID, payload) of every message in ``queue``, taken off it."""
    out = []
    for props, body in take_all(settings, queue):
        envelope = orjson.loads(body)
        assert props.delivery_mode == 2 and envelope["actor_name"] == "order_placed"
        out.append((props.message_id, envelope["args"][0]))
    return out


def pending(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM issuance_outbox WHERE sent_at IS NULL").fetchone()
    conn.commit()
    return int(row[0]) if row else 0


def test_publisher_api_publishes_one_or_many_confirmed(settings: Settings) -> None:
    purge(settings)
    with RabbitPublisher.from_settings(settings, window=500) as publisher:
        publisher.publish(order(0))
        assert publisher.publish_many(order(n) for n in range(1, 1201)) == 1200
    got = queued(settings)
    assert len(got) == 1201
    assert {payload["order_id"] for _, payload in got} == {f"SO-outbox-{n}" for n in range(1201)}
    assert got[0][0] == codec.message_id_for(order(0))


def test_committed_order_is_published_once(settings: Settings, order_db: psycopg.Connection[Any]) -> None:
    place_order(order_db, order(1))
    assert queued(settings) == []  # nothing leaves before the relay
    with RabbitPublisher.from_settings(settings) as publisher:
        assert outbox.relay_once(order_db, publisher) == 1
        assert outbox.relay_once(order_db, publisher) == 0
    got = queued(settings)
    assert [payload["order_id"] for _, payload in got] == ["SO-outbox-1"]
    assert OrderPlaced.from_payload(got[0][1]) == order(1)
    assert pending(order_db) == 0


def test_rolled_back_order_leaves_no_event(settings: Settings, order_db: psycopg.Connection[Any]) -> None:
    with pytest.raises(RuntimeError), order_db.transaction():
        order_db.execute("INSERT INTO orders_demo VALUES ('SO-outbox-2', 100)")
        outbox.add(order_db, order(2))
        raise RuntimeError("payment declined")
    place_order(order_db, order(3))
    # An event whose order cannot be written is not written either.
    with pytest.raises(psycopg.errors.UniqueViolation):
        place_order(order_db, order(3))
    rows = order_db.execute("SELECT payload->>'order_id' FROM issuance_outbox ORDER BY outbox_id").fetchall()
    assert rows == [("SO-outbox-3",)]
    with RabbitPublisher.from_settings(settings) as publisher:
        assert outbox.relay_once(order_db, publisher) == 1
    assert [payload["order_id"] for _, payload in queued(settings)] == ["SO-outbox-3"]


class DiesAfterPublishing(Publisher):
    """A relay's publisher whose process dies right after the broker confirmed."""

    def __init__(self, inner: Publisher) -> None:
        self.inner = inner

    def publish_many(self, messages: Iterable[Message]) -> int:
        self.inner.publish_many(messages)
        raise SystemExit("killed before marking the rows sent")


def test_relay_crash_before_marking_sent_resends_and_duplicates_are_harmless(
    settings: Settings, order_db: psycopg.Connection[Any], service_env: dict[str, str], tmp_path: Path
) -> None:
    for n in range(10, 15):
        place_order(order_db, order(n))
    with RabbitPublisher.from_settings(settings) as publisher:
        with pytest.raises(SystemExit):
            outbox.relay_once(order_db, DiesAfterPublishing(publisher))
        assert pending(order_db) == 5  # the rows were never marked sent
        assert outbox.relay_once(order_db, publisher) == 5
    assert pending(order_db) == 0
    # Each event is in the queue twice, under one message ID.
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    declared = connection.channel().queue_declare("orders", passive=True)
    connection.close()
    assert declared.method.message_count == 10
    with workers_running(service_env, settings, tmp_path / "workers.log"):
        expected = [(f"SO-outbox-{n}",) for n in range(10, 15)]
        wait_for(lambda: shares(settings) == expected, timeout=30, what="the shares to be opened")
        wait_for(lambda: queued(settings) == [], timeout=30, what="the duplicates to be consumed")
    assert shares(settings) == expected


def shares(settings: Settings) -> list[tuple[str]]:
    with psycopg.connect(settings.database_url) as conn:
        return conn.execute("SELECT order_id FROM shares ORDER BY order_id").fetchall()


def test_concurrent_relays_publish_each_row_once(
    settings: Settings, order_db: psycopg.Connection[Any]
) -> None:
    with order_db.transaction():
        for n in range(2000):
            outbox.add(order_db, order(n))
    stop = threading.Event()
    relays = [
        threading.Thread(
            target=outbox.relay_forever,
            args=(settings.database_url, settings),
            kwargs={"batch": 100, "stop": stop, "idle_seconds": 0.05},
        )
        for _ in range(3)
    ]
    for relay in relays:
        relay.start()
    try:
        wait_for(lambda: pending(order_db) == 0, timeout=60, what="the relays to drain the outbox")
    finally:
        stop.set()
        for relay in relays:
            relay.join(30)
    got = queued(settings)
    assert len(got) == 2000
    assert len({message_id for message_id, _ in got}) == 2000


def test_internal_messages_cannot_enter_the_outbox(order_db: psycopg.Connection[Any]) -> None:
    internal = [t for name, t in MESSAGE_TYPES.items() if name not in PUBLIC_TYPES]
    assert internal
    for message_type in internal:
        with pytest.raises(ValueError, match="internal"):
            outbox.add(order_db, message_type.from_payload(dict(message_type.EXAMPLE)))
    order_db.rollback()
