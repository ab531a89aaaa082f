"""The one codec: wire format, queue names and queue arguments.

The wire format is Dramatiq's envelope, encoded with orjson::

    {"queue_name": "claims", "actor_name": "claim_requested",
     "args": [<payload>], "kwargs": {}, "options": {},
     "message_id": "<uuid>", "message_timestamp": <unix ms>}

published to the default exchange with the queue name as routing key,
``delivery_mode=2`` (persistent) and ``content_type=application/json``.
Producers (any language) and workers import this module, so they cannot drift.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

import orjson
from dramatiq.encoder import Encoder
from dramatiq.errors import DecodeError
from issuance.shared.errors import InvalidMessage
from issuance.shared.wire.messages import MESSAGE_TYPES, Message
from issuance.shared.wire.signing import process_keys, sign_envelope

CONTENT_TYPE = "application/json"
# Dramatiq keeps dead-lettered messages in "<queue>.XQ" for 7 days.
DEAD_MESSAGE_TTL_MS = 86_400_000 * 7
MAX_ENVELOPE_BYTES = 64 * 1024
# Quorum queues count how often a message went back to the queue unacknowledged
# (its worker died, or its node or connection was lost, before the ack).
# Past this many returns RabbitMQ dead-letters it to "<queue>.XQ" (x-death
# reason "delivery_limit") instead of handing it out again, so a message
# that kills every worker that takes it cannot loop forever; `issuance
# dead-letters drain` moves it into the dead-letter store. Retries after an
# exception do not count: Dramatiq acknowledges and re-enqueues those.
DELIVERY_LIMIT = 20
# Message IDs of re-sent business events are stable, so the dead-letter
# store and the duplicate counters see one event, not two.
MESSAGE_ID_NAMESPACE = uuid.UUID("1d3c2b6a-5f4e-4d8c-9b7a-6e5f4d3c2b1a")


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    queue: str
    actor: str


ROUTES: dict[str, Route] = {
    "order-placed": Route("orders", "order_placed"),
    "share-opened": Route("shares", "share_opened"),
    "claim-requested": Route("claims", "claim_requested"),
    "claims-requested": Route("claims", "claims_requested"),
    "credit-requested": Route("credits", "credit_claim"),
    "order-status-changed": Route("orders", "order_status_changed"),
    "member-registered": Route("members", "member_registered"),
    # Between cells (issuance.workers.cell_referrals), on the queues of their kind.
    "share-known": Route("shares", "share_known"),
    "referral-crossed": Route("orders", "referral_crossed"),
}
TYPE_BY_ACTOR = {route.actor: type_ for type_, route in ROUTES.items()}
QUEUES = tuple(dict.fromkeys(route.queue for route in ROUTES.values()))

# The acceptance ledger: a RabbitMQ stream that keeps a copy of every claim
# envelope a producer published, for ``LEDGER_MAX_AGE`` or up to
# ``LEDGER_MAX_BYTES``. Claims are published through ``LEDGER_EXCHANGE``
# (direct), where both the ``claims`` queue and the stream are bound with the
# routing key ``claims``: the one publisher confirm arrives only after both
# took the message, so "accepted" means "in the ledger" too.
# issuance.shared.db.ledger reconciles it against the database.
LEDGER_QUEUE = "claims.accepted"
LEDGER_ROUTE = "claims"
LEDGER_EXCHANGE = "issuance.producers"
LEDGER_MAX_AGE = "7D"
LEDGER_MAX_BYTES = 5_000_000_000


def xq_name(queue: str) -> str:
    return f"{queue}.XQ"


def dq_name(queue: str) -> str:
    return f"{queue}.DQ"


def queue_arguments(queue: str, queue_type: str = "classic") -> dict[str, Any]:
    """Arguments every declarer of ``queue`` (and of its delay queue) must
    use, or RabbitMQ refuses the declaration with PRECONDITION_FAILED.

    ``classic``: Dramatiq's own, exactly. ``quorum`` (a cluster) adds:
    dead-lettering at-least-once (a message leaves the queue only once its
    .XQ has confirmed it, not at-most-once as classic queues do; RabbitMQ
    allows that strategy only with ``overflow: reject-publish``, which never
    triggers here as no length limit is set), and ``DELIVERY_LIMIT``."""
    arguments: dict[str, Any] = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": xq_name(queue)}
    if _queue_type(queue_type) == "quorum":
        arguments |= {
            "x-queue-type": "quorum",
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
            "x-delivery-limit": DELIVERY_LIMIT,
        }
    return arguments


def xq_arguments(queue_type: str = "classic") -> dict[str, Any]:
    arguments: dict[str, Any] = {"x-message-ttl": DEAD_MESSAGE_TTL_MS}
    if _queue_type(queue_type) == "quorum":
        arguments["x-queue-type"] = "quorum"
    return arguments


def ledger_arguments() -> dict[str, Any]:
    """The ledger stream's arguments, for its declarer and the deploy
    definitions alike (a stream whatever the work queues' type)."""
    return {"x-queue-type": "stream", "x-max-age": LEDGER_MAX_AGE, "x-max-length-bytes": LEDGER_MAX_BYTES}


def _queue_type(queue_type: str) -> str:
    if queue_type not in ("classic", "quorum"):
        raise ValueError(f"unknown queue type {queue_type!r}: classic or quorum")
    return queue_type


def message_id_for(message: Message) -> str:
    return str(uuid.uuid5(MESSAGE_ID_NAMESPACE, f"{message.TYPE}:{message.business_key()}"))


def envelope(message: Message, *, timestamp_ms: int | None = None) -> dict[str, Any]:
    """The Dramatiq envelope that carries ``message``."""
    route = ROUTES[message.TYPE]
    fields = {
        "queue_name": route.queue,
        "actor_name": route.actor,
        "args": [message.to_payload()],
        "kwargs": {},
        "options": {},
        "message_id": message_id_for(message),
        "message_timestamp": timestamp_ms if timestamp_ms is not None else int(time.time() * 1000),
    }
    # Signed when ISSUANCE_SIGNING_KEYS is set (issuance.shared.wire.signing).
    return sign_envelope(fields, process_keys())


def encode(message: Message) -> bytes:
    """The bytes a producer publishes for ``message``."""
    return orjson.dumps(envelope(message))


def decode_payload(actor_name: str, payload: Any) -> Message:
    """Turn an actor's argument back into a typed message, or raise InvalidMessage."""
    type_ = TYPE_BY_ACTOR.get(actor_name)
    if type_ is None:
        raise InvalidMessage("unknown_actor", f"no actor named {actor_name!r}")
    return MESSAGE_TYPES[type_].from_payload(payload)


def parse_line(type_: str, line: bytes | str) -> Message:
    """One JSON line of a replay file: a bare payload of the given type."""
    if type_ not in MESSAGE_TYPES:
        raise InvalidMessage("unknown_type", f"no message type {type_!r}")
    try:
        payload = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage("bad_json", str(exc)) from None
    return MESSAGE_TYPES[type_].from_payload(payload)


def dumps(value: Any) -> bytes:
    """orjson with the options every writer here uses."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)


def _decode_error(reason: str, data: bytes, cause: Exception | None) -> DecodeError:
    return DecodeError(reason, data, cause)  # type: ignore[no-untyped-call]


class OrjsonEncoder(Encoder):
    """Dramatiq's encoder, on orjson. Decoding checks the envelope's shape so
    that a malformed message fails here (and is dead-lettered by the broker)
    instead of deep inside a worker."""

    ENVELOPE_KEYS = frozenset(
        ("queue_name", "actor_name", "args", "kwargs", "options", "message_id", "message_timestamp")
    )

    def encode(self, data: dict[str, Any]) -> bytes:
        return orjson.dumps(data)

    def decode(self, data: bytes) -> dict[str, Any]:
        if len(data) > MAX_ENVELOPE_BYTES:
            raise _decode_error(f"envelope of {len(data)} bytes exceeds {MAX_ENVELOPE_BYTES}", data, None)
        try:
            fields = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise _decode_error("envelope is not JSON", data, exc) from None
        if not isinstance(fields, dict):
            raise _decode_error("envelope is not a JSON object", data, None)
        fields.setdefault("kwargs", {})
        fields.setdefault("options", {})
        if set(fields) - self.ENVELOPE_KEYS or not {"queue_name", "actor_name", "args"} <= set(fields):
            raise _decode_error("envelope fields do not match Dramatiq's", data, None)
        if not isinstance(fields["args"], list) or not isinstance(fields["options"], dict):
            raise _decode_error("envelope args must be a list and options an object", data, None)
        if len(fields["args"]) != 1:
            raise _decode_error("envelope args must hold exactly one payload", data, None)
        if not isinstance(fields["kwargs"], dict) or fields["kwargs"]:
            raise _decode_error("envelope kwargs must be empty", data, None)
        return fields
