"""Move what RabbitMQ dead-lettered into the dead-letter store, and replay it.

Dramatiq rejects a delivery it cannot decode, one for an actor it does not
know, and a message whose retries are exhausted, into ``<queue>.XQ``.
``issuance dead-letters drain`` moves those into PostgreSQL's ``dead_letters``
table with the reason, so every unusable message ends in one place an
operator can query. Any body is drained: empty, not JSON, the wrong shape,
huge. The store keeps at most :data:`MAX_STORED_BYTES` of it (redacted) with
its SHA-256 and size in ``headers``, so one bad envelope cannot jam the queue.

``issuance dead-letters replay`` re-publishes chosen entries after a fix.
Phone numbers are never stored in clear, so the original of a message that
carries one is parked in ``<queue>.parked`` (RabbitMQ, the same 7-day TTL
as the ``.XQ`` queue it came from) and replayed from there; any other
well-formed envelope is replayed from its stored body. A replayed entry is
marked (``headers.replayed_at``) in the transaction that selected it, after
RabbitMQ confirmed the publish: a second replay does nothing, and a crash in
between re-publishes a message whose handler is idempotent (claims by
claim ID, credits per claim and code).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any

import orjson
import pika
from issuance.shared.db import store
from issuance.shared.domain import mask_phone
from issuance.shared.domain import redact_payload as redact
from issuance.shared.errors import BadInput
from issuance.shared.settings import Settings
from issuance.shared.wire import amqp, codec

log = logging.getLogger(__name__)

# What the store keeps of a body: a whole envelope up to the largest one a
# producer may send, an excerpt of anything bigger.
MAX_STORED_BYTES = codec.MAX_ENVELOPE_BYTES
EXCERPT_BYTES = 4096
# A phone number in a body that is not JSON (or too big to parse and redact).
_DIGIT_RUN = re.compile(r"\+?\d{7,}")
# Message IDs (UUIDs) and SHA-256 digests: keys that carry no number.
_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{64}")


class Reason(StrEnum):
    """Why RabbitMQ holds a message (``dead_letters.reason`` for drained ones)."""

    UNDECODABLE_ENVELOPE = "undecodable_envelope"  # not JSON
    BAD_ENVELOPE = "bad_envelope"  # JSON, not Dramatiq's envelope shape
    UNKNOWN_ACTOR = "unknown_actor"
    WRONG_QUEUE = "wrong_queue"  # the actor is consumed from another queue
    TOO_LARGE = "too_large"
    RETRIES_EXHAUSTED = "retries_exhausted"
    REJECTED = "rejected"  # rejected without a retry history (x-death says why)


class Original(StrEnum):
    """Where ``replay`` finds the message to re-publish."""

    STORED = "stored"  # the stored body is the whole envelope
    PARKED = "parked"  # the stored body is redacted; the original waits in <queue>.parked


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DeadEnvelope:
    """One dead-lettered delivery, as the store keeps it."""

    key: str
    queue: str
    actor: str
    reason: Reason
    detail: str
    body: str
    headers: dict[str, Any]
    original: Original | None


def parked_name(queue: str) -> str:
    return f"{queue}.parked"


def _mask(text: str) -> str:
    """``text`` with digit runs masked like phone numbers (the one mask,
    :func:`issuance.shared.domain.mask_phone`) and without NUL (which
    PostgreSQL text and JSON cannot hold)."""
    return _DIGIT_RUN.sub(lambda m: mask_phone(m.group()), text).replace("\x00", "\\x00")


def _key(text: str) -> str:
    """A message key as stored: a message ID or digest as it is (replay finds
    the parked original by it), anything else masked like free text."""
    return text if _ID.fullmatch(text) else _mask(text)[:80]


def _excerpt(body: bytes) -> str:
    return _mask(body[:EXCERPT_BYTES].decode("utf-8", "backslashreplace"))


def _last_line(text: Any) -> str:
    lines = str(text or "").strip().splitlines()
    return lines[-1] if lines else ""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _Verdict:
    """Why a delivery is dead, and what of it the store keeps."""

    reason: Reason
    detail: str
    actor: str = "?"
    stored: str | None = None  # the (redacted) envelope; None keeps an excerpt of the body
    key: str | None = None  # the envelope's message ID
    original: Original | None = None


def inspect(queue: str, properties: Any, body: bytes) -> DeadEnvelope:
    """Classify a delivery taken off ``<queue>.XQ``. Never raises, whatever
    the body: a dead letter that cannot be read is still stored."""
    digest = hashlib.sha256(body).hexdigest()
    raw_headers = getattr(properties, "headers", None)
    x_death = raw_headers.get("x-death") if isinstance(raw_headers, dict) else None
    verdict = _classify(queue, body, x_death)
    return DeadEnvelope(
        key=_key(str(verdict.key or getattr(properties, "message_id", None) or digest)),
        queue=queue,
        actor=_mask(verdict.actor)[:64],
        reason=verdict.reason,
        detail=verdict.detail[:2000],
        body=verdict.stored if verdict.stored is not None else _excerpt(body),
        headers={
            "sha256": digest,
            "size": len(body),
            "x-death": _mask(str(x_death or ""))[:2000],
            "truncated": verdict.stored is None,
        },
        original=verdict.original,
    )


def _classify(queue: str, body: bytes, x_death: Any) -> _Verdict:
    """Why the delivery is dead, from its size, its JSON, then its envelope."""
    if len(body) > MAX_STORED_BYTES:
        return _Verdict(reason=Reason.TOO_LARGE, detail=f"{len(body)} bytes, more than {MAX_STORED_BYTES}")
    try:
        envelope = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return _Verdict(reason=Reason.UNDECODABLE_ENVELOPE, detail=f"not JSON: {exc}")
    if not isinstance(envelope, dict):
        detail = f"the envelope is a JSON {type(envelope).__name__}, not an object"
        return _Verdict(reason=Reason.BAD_ENVELOPE, detail=detail)
    return _classify_envelope(queue, body, envelope, x_death)


def _classify_envelope(queue: str, body: bytes, envelope: dict[str, Any], x_death: Any) -> _Verdict:
    envelope_id = envelope.get("message_id")
    key = envelope_id if isinstance(envelope_id, str) and envelope_id else None
    args, actor, options = envelope.get("args"), envelope.get("actor_name"), envelope.get("options")
    if isinstance(args, list) and args:
        envelope = {**envelope, "args": [redact(args[0]), *args[1:]]}
    stored = codec.dumps(envelope).decode()
    if not isinstance(actor, str):
        detail = "actor_name is missing or not a string"
        return _Verdict(reason=Reason.BAD_ENVELOPE, detail=detail, stored=stored, key=key)
    if not isinstance(args, list) or not args:
        detail = "args is empty or not a list"
        return _Verdict(reason=Reason.BAD_ENVELOPE, detail=detail, actor=actor, stored=stored, key=key)
    if not isinstance(options, dict):
        detail = "options is not an object"
        return _Verdict(reason=Reason.BAD_ENVELOPE, detail=detail, actor=actor, stored=stored, key=key)
    original = Original.STORED if stored.encode() == codec.dumps(orjson.loads(body)) else Original.PARKED
    reason, detail = _why_dead(queue, actor, envelope, options, x_death)
    return _Verdict(reason=reason, detail=detail, actor=actor, stored=stored, key=key, original=original)


def _why_dead(
    queue: str, actor: str, envelope: dict[str, Any], options: dict[str, Any], x_death: Any
) -> tuple[Reason, str]:
    """Why a well-formed envelope is dead: an actor this version lacks, the
    wrong queue, exhausted retries, or else the broker rejected it."""
    type_ = codec.TYPE_BY_ACTOR.get(actor)
    if type_ is None:
        return Reason.UNKNOWN_ACTOR, f"no actor named {actor!r}"
    route = codec.ROUTES[type_]
    if route.queue != queue or envelope.get("queue_name") != queue:
        return (
            Reason.WRONG_QUEUE,
            f"{actor} is consumed from {route.queue!r}, the message was on {envelope.get('queue_name')!r}",
        )
    if "retries" in options:
        detail = _last_line(options.get("traceback")) or f"{options['retries']} retries"
        return Reason.RETRIES_EXHAUSTED, detail
    return Reason.REJECTED, f"rejected by the broker ({_first_death(x_death).get('reason', 'no x-death')})"


def _first_death(x_death: Any) -> dict[str, Any]:
    """The first entry of RabbitMQ's ``x-death`` header, or nothing."""
    if isinstance(x_death, list) and x_death and isinstance(x_death[0], dict):
        return x_death[0]
    return {}


def drain(settings: Settings, pool: Any, *, limit: int = 10_000) -> int:
    """Move up to ``limit`` messages from every ``<queue>.XQ``; returns how many."""
    moved = 0
    connection = amqp.connect(settings.amqp_url)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for queue in codec.QUEUES:
            xq = codec.xq_name(queue)
            channel.queue_declare(xq, durable=True, arguments=codec.xq_arguments(settings.queue_type))
            channel.queue_declare(
                parked_name(queue), durable=True, arguments=codec.xq_arguments(settings.queue_type)
            )
            while moved < limit:
                method, properties, body = channel.basic_get(xq, auto_ack=False)
                if method is None:
                    break
                dead = inspect(queue, properties, body)
                if dead.original is Original.PARKED:
                    # Confirmed before the XQ copy is acknowledged: never neither.
                    channel.basic_publish(
                        "",
                        parked_name(queue),
                        body,
                        pika.BasicProperties(
                            delivery_mode=2, message_id=dead.key, headers={"sha256": dead.headers["sha256"]}
                        ),
                        mandatory=True,
                    )
                with pool.connection() as conn, conn.transaction():
                    store.insert_dead_letter(
                        conn,
                        message_key=dead.key,
                        queue=dead.queue,
                        actor=dead.actor,
                        reason=dead.reason,
                        detail=dead.detail,
                        body=dead.body,
                        headers={**dead.headers, "original": dead.original}
                        if dead.original
                        else dead.headers,
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


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Selection:
    """Which dead letters to replay; every given criterion must match."""

    ids: Sequence[int] = ()
    reason: str | None = None
    queue: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        if not (self.ids or self.reason or self.queue or self.since or self.until):
            raise BadInput("choose the dead letters to replay: --id, --reason, --queue, --since or --until")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ReplayResult:
    replayed: list[int]
    # dead_letter_id -> why it was not replayed
    skipped: dict[int, str]


# Locked for the transaction that publishes them: two replays at once take
# different rows, and a replayed row is marked before the lock is released.
SELECT_TO_REPLAY = """
SELECT dead_letter_id, message_key, queue, actor, body, headers
  FROM dead_letters
 WHERE NOT coalesce(headers ? 'replayed_at', false)
   AND (cardinality(%(ids)s::bigint[]) = 0 OR dead_letter_id = ANY(%(ids)s::bigint[]))
   AND (%(reason)s::text IS NULL OR reason = %(reason)s)
   AND (%(queue)s::text IS NULL OR queue = %(queue)s)
   AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s)
   AND (%(until)s::timestamptz IS NULL OR created_at < %(until)s)
 ORDER BY dead_letter_id
 FOR UPDATE SKIP LOCKED
"""
MARK_REPLAYED = """
UPDATE dead_letters SET headers = coalesce(headers, '{}'::jsonb) || jsonb_build_object('replayed_at', now())
 WHERE dead_letter_id = ANY(%s::bigint[])
"""


def _replayable(envelope_body: bytes) -> tuple[str, bytes] | str:
    """(queue, body) to publish for a stored or parked envelope, or why not.
    The retry history goes (a replay starts afresh); the signature stays."""
    try:
        envelope = orjson.loads(envelope_body)
    except orjson.JSONDecodeError:
        return "the stored body is not an envelope"
    if not isinstance(envelope, dict) or not isinstance(envelope.get("args"), list) or not envelope["args"]:
        return "the stored body is not an envelope with arguments"
    type_ = codec.TYPE_BY_ACTOR.get(str(envelope.get("actor_name")))
    if type_ is None:
        return f"no actor named {envelope.get('actor_name')!r} in this version"
    route = codec.ROUTES[type_]
    options = envelope.get("options")
    kept = {"signature": options["signature"]} if isinstance(options, dict) and "signature" in options else {}
    return route.queue, codec.dumps({**envelope, "queue_name": route.queue, "options": kept})


def _take_parked(
    channel: Any, queues: set[str], keys: set[str], queue_type: str
) -> dict[str, tuple[int, bytes]]:
    """The parked originals of ``keys``, by key, each with its delivery tag.
    Every parked message is held unacknowledged until the channel closes, so
    one scan sees each once."""
    found: dict[str, tuple[int, bytes]] = {}
    for queue in queues:
        channel.queue_declare(parked_name(queue), durable=True, arguments=codec.xq_arguments(queue_type))
        while True:
            method, properties, body = channel.basic_get(parked_name(queue), auto_ack=False)
            if method is None:
                break
            if properties.message_id in keys and properties.message_id not in found:
                found[properties.message_id] = (method.delivery_tag, body)
    return found


def replay(settings: Settings, pool: Any, selection: Selection) -> ReplayResult:
    """Re-publish the chosen dead letters that were not replayed yet."""
    replayed: list[int] = []
    skipped: dict[int, str] = {}
    connection = amqp.connect(settings.amqp_url)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        parked_tags: list[int] = []
        with pool.connection() as conn, conn.transaction():
            rows = conn.execute(
                SELECT_TO_REPLAY,
                {
                    "ids": list(selection.ids),
                    "reason": selection.reason,
                    "queue": selection.queue,
                    "since": selection.since,
                    "until": selection.until,
                },
            ).fetchall()
            wanted = {row[1] for row in rows if (row[5] or {}).get("original") == Original.PARKED}
            parked = (
                _take_parked(channel, {row[2] for row in rows}, wanted, settings.queue_type) if wanted else {}
            )
            for dead_letter_id, key, _queue, _actor, body, headers in rows:
                origin = (headers or {}).get("original")
                if origin == Original.PARKED:
                    if key not in parked:
                        skipped[dead_letter_id] = "its original is no longer parked (expired after 7 days?)"
                        continue
                    tag, original = parked[key]
                    parked_tags.append(tag)
                elif origin == Original.STORED:
                    original = body.encode()
                else:
                    skipped[dead_letter_id] = "the store holds only an excerpt of it"
                    continue
                target = _replayable(original)
                if isinstance(target, str):
                    skipped[dead_letter_id] = target
                    continue
                queue, envelope = target
                channel.queue_declare(
                    queue, durable=True, arguments=codec.queue_arguments(queue, settings.queue_type)
                )
                channel.basic_publish(
                    "",
                    queue,
                    envelope,
                    pika.BasicProperties(delivery_mode=2, content_type=codec.CONTENT_TYPE, message_id=key),
                    mandatory=True,
                )
                replayed.append(dead_letter_id)
            if replayed:
                conn.execute(MARK_REPLAYED, (replayed,))
        # Committed: the parked originals of replayed entries can go.
        for tag in parked_tags:
            channel.basic_ack(tag)
    finally:
        connection.close()  # the other parked messages go back to their queue
    if replayed:
        log.warning("replayed %d dead letters", len(replayed))
    return ReplayResult(replayed=replayed, skipped=skipped)


LIST = """
SELECT dead_letter_id, created_at, queue, actor, reason,
       coalesce(headers ->> 'replayed_at', '') AS replayed_at, detail
  FROM dead_letters
 ORDER BY dead_letter_id DESC
 LIMIT %s
"""


def listing(conn: store.Conn, limit: int) -> list[str]:
    """The newest ``limit`` dead letters, one line each: ID, when, queue,
    actor, reason, when replayed (if it was), and the whole detail."""
    return [" | ".join(str(v) for v in row) for row in conn.execute(LIST, (limit,)).fetchall()]
