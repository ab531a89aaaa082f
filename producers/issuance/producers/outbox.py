"""A transactional outbox for order systems on PostgreSQL.

The order system writes its event in the same transaction as the order::

    from issuance.producers import outbox

    with psycopg.connect(dsn) as conn:       # once: outbox.install(conn)
        with conn.transaction():
            conn.execute("INSERT INTO orders ...", ...)
            outbox.add(conn, OrderPlaced(order_id="SO-1", member_id=7, amount_cents=1999, placed_at=now))

so the order and its event commit together or not at all. A relay
(``issuance outbox-relay --dsn <order database>``) publishes pending rows in
batches with publisher confirms and marks them sent in the transaction that
locked them. Rows are claimed with ``FOR UPDATE SKIP LOCKED``, so several
relays can run side by side. A relay that dies after publishing and before
its commit leaves the rows pending: they are published again, with the same
message IDs and idempotency keys, and the workers absorb the duplicate.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import psycopg
from issuance.shared.errors import InvalidMessage
from issuance.shared.settings import Settings
from issuance.shared.wire import codec
from issuance.shared.wire.messages import MESSAGE_TYPES, PUBLIC_TYPES, Message
from issuance.shared.wire.publisher import Publisher, RabbitPublisher
from psycopg import sql

log = logging.getLogger(__name__)

DEFAULT_TABLE = "issuance_outbox"
Conn = psycopg.Connection[Any]

DDL = (
    """
CREATE TABLE IF NOT EXISTS {table} (
    outbox_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_type text NOT NULL,
    payload      jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    sent_at      timestamptz,
    error        text
)
""",
    "CREATE INDEX IF NOT EXISTS {index} ON {table} (outbox_id) WHERE sent_at IS NULL AND error IS NULL",
)
INSERT = "INSERT INTO {table} (message_type, payload) VALUES (%s, %s::jsonb) RETURNING outbox_id"
PENDING = """
SELECT outbox_id, message_type, payload FROM {table}
 WHERE sent_at IS NULL AND error IS NULL
 ORDER BY outbox_id
 LIMIT %s
   FOR UPDATE SKIP LOCKED
"""
MARK_SENT = "UPDATE {table} SET sent_at = now() WHERE outbox_id = ANY(%s)"
MARK_FAILED = "UPDATE {table} SET error = %s WHERE outbox_id = %s"


def _table(name: str) -> sql.Identifier:
    return sql.Identifier(*name.split("."))


def _sql(template: str, table: str) -> sql.Composed:
    index = sql.Identifier(f"{table.rsplit('.', maxsplit=1)[-1]}_pending_idx")
    return sql.SQL(template).format(table=_table(table), index=index)


def install(conn: Conn, *, table: str = DEFAULT_TABLE) -> None:
    """Create the outbox table (idempotent). Run it as a migration of the
    order system's own database."""
    with conn.transaction():
        for statement in DDL:
            conn.execute(_sql(statement, table))


def add(conn: Conn, message: Message, *, table: str = DEFAULT_TABLE) -> int:
    """Write ``message`` in the caller's open transaction; returns its row ID.
    Nothing is published and nothing commits here."""
    if message.TYPE not in PUBLIC_TYPES:
        raise ValueError(f"{message.TYPE} is internal to the pipeline and cannot be published")
    row = conn.execute(
        _sql(INSERT, table), (message.TYPE, codec.dumps(message.to_payload()).decode())
    ).fetchone()
    assert row is not None, "INSERT ... RETURNING returns the row"
    return int(row[0])


def relay_once(conn: Conn, publisher: Publisher, *, batch: int = 500, table: str = DEFAULT_TABLE) -> int:
    """Publish up to ``batch`` pending rows, confirmed, and mark them sent in
    one transaction. Returns how many rows were published."""
    with conn.transaction():
        rows = conn.execute(_sql(PENDING, table), (batch,)).fetchall()
        if not rows:
            return 0
        ids, messages = [], []
        for outbox_id, message_type, payload in rows:
            try:
                type_ = MESSAGE_TYPES.get(message_type)
                if type_ is None:
                    raise InvalidMessage("unknown_type", f"no message type {message_type!r}")
                messages.append(type_.from_payload(payload))
                ids.append(outbox_id)
            except InvalidMessage as exc:
                # A poison row must not block the rows behind it forever.
                log.error("outbox row %d cannot be published: %s", outbox_id, exc)
                conn.execute(_sql(MARK_FAILED, table), (str(exc)[:500], outbox_id))
        publisher.publish_many(messages)
        conn.execute(_sql(MARK_SENT, table), (ids,))
    return len(ids)


def relay_forever(
    dsn: str,
    settings: Settings,
    *,
    batch: int = 500,
    table: str = DEFAULT_TABLE,
    idle_seconds: float = 0.2,
    stop: threading.Event | None = None,
    summary_seconds: float = 300.0,
) -> int:
    """The relay process: publish pending rows until ``stop`` is set,
    surviving outages of the database or the broker, with a summary line
    every ``summary_seconds`` in which rows were published. Returns how many
    rows it published."""
    stop = stop or threading.Event()
    total = since_summary = 0
    last_summary = time.monotonic()
    while not stop.is_set():
        try:
            with psycopg.connect(dsn) as conn, RabbitPublisher.from_settings(settings) as publisher:
                while not stop.is_set():
                    published = relay_once(conn, publisher, batch=batch, table=table)
                    total, since_summary = total + published, since_summary + published
                    if time.monotonic() - last_summary >= summary_seconds:
                        if since_summary:
                            log.info("outbox relay: published %d rows of %s", since_summary, table)
                        since_summary, last_summary = 0, time.monotonic()
                    if published < batch:
                        publisher.keepalive()
                        stop.wait(idle_seconds)
        except Exception as exc:  # the relay outlives every outage; rows stay pending
            log.warning("outbox relay interrupted (%s); retrying in a second", exc)
            stop.wait(1.0)
    return total
