"""The acceptance ledger, read: the ``claims.accepted`` stream.

Every claim envelope a producer published is in the stream as well as in the
``claims`` queue (one publish, one confirm: see
:mod:`issuance.shared.wire.publisher`). :func:`read` consumes the stream from
an offset, as RabbitMQ serves streams over AMQP 0.9.1: a prefetch limit
(required), manual acknowledgements (they only let more through; a stream
forgets nothing on ack), the start in the ``x-stream-offset`` consume
argument and each entry's offset in its ``x-stream-offset`` header.

:func:`entry` turns a stream message into what reconciliation needs: the
claims it carries and, for each, the keys under which the pipeline records
it (a ``claims`` row by claim ID, or a dead letter). It never raises: an
envelope nobody can read is settled only by a dead letter of the whole
message, as the workers leave for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pika
import pika.exceptions
from issuance.shared.errors import TransientError
from issuance.shared.wire import amqp, codec

# Unacknowledged entries in flight to the reader.
PREFETCH = 1000
# The stream has no end marker: it is read up to here when nothing new
# arrives for this long.
IDLE_SECONDS = 1.0
# Waiting this long for an entry known to exist is a stalled read.
STALL_SECONDS = 30.0
CONNECTION_ERRORS = (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError, OSError)


class LedgerAbsent(Exception):
    """The vhost has no ledger stream (the embedded demo, or a broker the
    deploy definitions were not loaded into)."""


class LedgerRecreated(Exception):
    """The checkpoint lies past the stream's end: the stream was deleted and
    declared anew, its offsets starting from 0 again."""


class LedgerStalled(TransientError):
    """The stream stopped delivering before its end: what it holds was not all read."""


@dataclasses.dataclass(frozen=True, slots=True)
class Unit:
    """One claim of an entry: settled once the database has a ``claims`` row
    for ``claim_id`` or a dead letter under one of ``dead_keys``."""

    claim_id: uuid.UUID | None
    dead_keys: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """One envelope in the ledger."""

    offset: int
    body: bytes
    message_id: str
    # When the producer published it (the envelope's timestamp), Unix ms.
    accepted_ms: int
    units: tuple[Unit, ...]

    def item(self) -> tuple[str, bytes, str]:
        """(queue, body, message ID): the envelope as it is re-published."""
        return codec.LEDGER_ROUTE, self.body, self.message_id


def entry(offset: int, body: bytes, message_id: str | None, published_ms: int | None = None) -> Entry:
    """What the ledger message at ``offset`` promises; never raises."""
    try:
        envelope = orjson.loads(body)
    except orjson.JSONDecodeError:
        envelope = None
    if not isinstance(envelope, dict):
        envelope = {}
    mid = envelope.get("message_id")
    # The key a dead letter of the whole message has (issuance.shared.db.dead_letters).
    message_id = mid if isinstance(mid, str) and mid else (message_id or hashlib.sha256(body).hexdigest())
    stamp = envelope.get("message_timestamp")
    accepted_ms = stamp if isinstance(stamp, int) else (published_ms or 0)
    args = envelope.get("args")
    payload = args[0] if isinstance(args, list) and args else None
    whole = (message_id,)
    units: tuple[Unit, ...]
    actor = envelope.get("actor_name")
    if actor == "claims_requested" and isinstance(payload, dict) and isinstance(payload.get("claims"), list):
        batch = str(payload.get("batch_id"))
        units = tuple(
            Unit(_claim_id(item), (f"{batch}:{index}", *whole))
            for index, item in enumerate(payload["claims"])
        )
    elif actor == "claim_requested" and isinstance(payload, dict):
        units = (Unit(_claim_id(payload), whole),)
    else:
        units = ()
    # An entry with no readable claim is settled by a dead letter of the whole message.
    return Entry(offset, body, message_id, accepted_ms, units or (Unit(None, whole),))


def _claim_id(payload: Any) -> uuid.UUID | None:
    value = payload.get("claim_id") if isinstance(payload, dict) else None
    if not isinstance(value, str):
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def _offset(properties: Any) -> int | None:
    headers = getattr(properties, "headers", None) or {}
    value = headers.get("x-stream-offset")
    return int(value) if isinstance(value, int) else None


def read(url: str, start: int | None, *, until_ms: int, idle: float = IDLE_SECONDS) -> Iterator[Entry]:
    """The ledger's entries from offset ``start`` (``None``: its first),
    in order, up to the first accepted at ``until_ms`` or later or the end
    of the stream. Raises LedgerAbsent without a stream, LedgerStalled when
    the stream stops short of the end it had when reading began, and pika's
    connection errors when RabbitMQ cannot be reached."""
    connection = amqp.connect(url)
    try:
        channel = connection.channel()
        try:
            # How many entries the stream holds now: its last offset is at
            # least one less (more once old segments were dropped).
            floor = int(channel.queue_declare(codec.LEDGER_QUEUE, passive=True).method.message_count) - 1
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                raise LedgerAbsent(f"no {codec.LEDGER_QUEUE} stream in this vhost") from None
            raise
        channel.basic_qos(prefetch_count=PREFETCH)
        if start is not None and start > floor + 1:
            # Past the entries the stream holds: old segments were dropped,
            # or the stream was deleted and declared anew (offsets from 0).
            end = _last_offset(channel, idle)
            if start > end + 1:
                raise LedgerRecreated(f"checkpoint {start} is past the ledger's last offset {end}")
        yield from _consume(channel, start, until_ms=until_ms, idle=idle, floor=floor)
    finally:
        with contextlib.suppress(Exception):  # closing a broken connection
            connection.close()


def _last_offset(channel: Any, idle: float) -> int:
    """The stream's last offset (-1 when empty): the end of its last chunk."""
    last = -1
    for method, properties, _body in channel.consume(
        codec.LEDGER_QUEUE, auto_ack=False, arguments={"x-stream-offset": "last"}, inactivity_timeout=idle
    ):
        if method is None:
            break
        channel.basic_ack(method.delivery_tag)
        offset = _offset(properties)
        last = last if offset is None else max(last, offset)
    channel.cancel()
    return last


def _consume(channel: Any, start: int | None, *, until_ms: int, idle: float, floor: int) -> Iterator[Entry]:
    arguments = {"x-stream-offset": "first" if start is None else start}
    last = -1 if start is None else start - 1
    waited = 0.0
    unacked = 0
    for method, properties, body in channel.consume(
        codec.LEDGER_QUEUE, auto_ack=False, arguments=arguments, inactivity_timeout=idle
    ):
        if method is None:
            if last >= floor:
                return  # nothing new for ``idle`` seconds, and the end reached
            waited += idle
            if waited >= STALL_SECONDS:
                raise LedgerStalled(f"the ledger stopped at offset {last}, short of {floor}")
            continue
        waited = 0.0
        unacked += 1
        if unacked >= PREFETCH // 2:  # acknowledging only lets more through
            channel.basic_ack(method.delivery_tag, multiple=True)
            unacked = 0
        offset = _offset(properties)
        if offset is None or offset <= last:
            continue  # a chunk begins before the requested offset
        last = offset
        found = entry(offset, body, getattr(properties, "message_id", None), _timestamp(properties))
        if found.accepted_ms >= until_ms:
            return
        yield found


def _timestamp(properties: Any) -> int | None:
    stamp = getattr(properties, "timestamp", None)
    return stamp * 1000 if isinstance(stamp, int) else None


def now_ms() -> int:
    return int(time.time() * 1000)
