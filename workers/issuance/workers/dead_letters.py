"""Move what RabbitMQ dead-lettered into the dead-letter store.

Dramatiq rejects a delivery it cannot decode, and a message whose retries
are exhausted, into ``<queue>.XQ``. ``issuance dead-letters drain`` moves
those into PostgreSQL's ``dead_letters`` table with the reason, so every
unusable message ends in one place an operator can query.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import orjson
from issuance.shared.db import store
from issuance.shared.settings import Settings
from issuance.shared.wire import amqp, codec
from issuance.workers.runtime import redact

log = logging.getLogger(__name__)


def _reason(properties: Any, body: bytes) -> tuple[str, str, str]:
    """(reason, detail, actor) of a dead-lettered delivery."""
    try:
        envelope = codec.OrjsonEncoder().decode(body)
    except Exception as exc:
        return "undecodable_envelope", str(exc), "?"
    options = envelope.get("options", {})
    deaths = (properties.headers or {}).get("x-death") or [{}]
    detail = str(options.get("traceback", "")).strip().splitlines()[-1:] or [str(deaths[0].get("reason", ""))]
    return "retries_exhausted", detail[0][:2000], str(envelope.get("actor_name", "?"))


def drain(settings: Settings, pool: Any, *, limit: int = 10_000) -> int:
    """Move up to ``limit`` messages from every ``<queue>.XQ``; returns how many."""
    moved = 0
    connection = amqp.connect(settings.amqp_url)
    try:
        channel = connection.channel()
        for queue in codec.QUEUES:
            xq = codec.xq_name(queue)
            channel.queue_declare(xq, durable=True, arguments=codec.xq_arguments(settings.queue_type))
            while moved < limit:
                method, properties, body = channel.basic_get(xq, auto_ack=False)
                if method is None:
                    break
                reason, detail, actor = _reason(properties, body)
                try:
                    payload: Any = orjson.loads(body)
                    text = orjson.dumps(
                        redact(payload.get("args", [None])[0]) if isinstance(payload, dict) else payload
                    )
                except orjson.JSONDecodeError:
                    text = body[:4096].decode("utf-8", "backslashreplace").encode()
                key = properties.message_id or hashlib.sha256(body).hexdigest()
                with pool.connection() as conn, conn.transaction():
                    store.insert_dead_letter(
                        conn,
                        message_key=key,
                        queue=queue,
                        actor=actor,
                        reason=reason,
                        detail=detail,
                        body=text.decode(errors="replace"),
                        headers={"x-death": str((properties.headers or {}).get("x-death", ""))[:2000]},
                    )
                # Acknowledged only once stored: a crash here re-delivers, and the
                # store's (message, reason) key absorbs the repeat.
                channel.basic_ack(method.delivery_tag)
                moved += 1
    finally:
        connection.close()
    if moved:
        log.warning("moved %d dead-lettered messages into the dead-letter store", moved)
    return moved
