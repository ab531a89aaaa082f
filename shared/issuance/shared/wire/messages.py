"""The messages that cross the broker: data only, named in the past tense.

Each type knows its wire name and schema version and how to read itself from a
decoded JSON payload, checking every field. The field specifications below
are also the source of the published JSON Schemas (``issuance schemas``), so
the documentation cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

import uuid6
from issuance.shared.errors import InvalidMessage

E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
ORDER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
CODE = re.compile(r"^[23456789ABCDEFGHJKLMNPQRSTUVWXYZ]{10,16}$")
MAX_AMOUNT_CENTS = 10**11  # a billion in currency units: anything above is a bug upstream
MAX_CODES_PER_ORDER = 20
MAX_MEMBER_ID = 2**63 - 1
MAX_ITEMS = 100_000
# A channel's name as the back office keeps it: any printable text.
CHANNEL = re.compile(r"^[^\x00-\x1f\x7f]{1,64}$")
STORE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")

Parser = Callable[[Any], Any]


@dataclasses.dataclass(frozen=True, slots=True)
class FieldSpec:
    """How one field is read from JSON and how the JSON Schema describes it."""

    parse: Parser
    schema: dict[str, Any]
    required: bool = True


def _fail(name: str, detail: str) -> InvalidMessage:
    return InvalidMessage("bad_field", f"{name}: {detail}")


def text(pattern: re.Pattern[str], description: str) -> FieldSpec:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise ValueError(f"must be {description}")
        return value

    return FieldSpec(parse, {"type": "string", "pattern": pattern.pattern, "description": description})


def integer(lo: int, hi: int, description: str) -> FieldSpec:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"must be an integer from {lo} to {hi}")
        return value

    return FieldSpec(parse, {"type": "integer", "minimum": lo, "maximum": hi, "description": description})


def timestamp(description: str) -> FieldSpec:
    def parse(value: Any) -> datetime:
        if not isinstance(value, str) or len(value) > 40:
            raise ValueError("must be an RFC 3339 timestamp with an offset")
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("must be an RFC 3339 timestamp with an offset") from None
        if parsed.tzinfo is None:
            raise ValueError("must carry a UTC offset")
        return parsed.astimezone(UTC)

    return FieldSpec(parse, {"type": "string", "format": "date-time", "description": description})


def uuid_field(description: str) -> FieldSpec:
    def parse(value: Any) -> uuid.UUID:
        if not isinstance(value, str) or len(value) != 36:
            raise ValueError("must be a UUID in its 36-character form")
        try:
            return uuid.UUID(value)
        except ValueError:
            raise ValueError("must be a UUID in its 36-character form") from None

    return FieldSpec(parse, {"type": "string", "format": "uuid", "description": description})


def optional(spec: FieldSpec) -> FieldSpec:
    def parse(value: Any) -> Any:
        return None if value is None else spec.parse(value)

    return FieldSpec(parse, {"anyOf": [spec.schema, {"type": "null"}]}, required=False)


def code_list(description: str) -> FieldSpec:
    def parse(value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or len(value) > MAX_CODES_PER_ORDER:
            raise ValueError(f"must be a list of at most {MAX_CODES_PER_ORDER} codes")
        if not all(isinstance(c, str) and CODE.fullmatch(c) for c in value):
            raise ValueError("every code must be 10 to 16 characters of the code alphabet")
        if len(set(value)) != len(value):
            raise ValueError("must not repeat a code")
        return tuple(value)

    schema = {
        "type": "array",
        "items": {"type": "string", "pattern": CODE.pattern},
        "maxItems": MAX_CODES_PER_ORDER,
        "uniqueItems": True,
        "description": description,
    }
    return FieldSpec(parse, schema, required=False)


def uuid_list(description: str, most: int) -> FieldSpec:
    item = uuid_field("")

    def parse(value: Any) -> tuple[uuid.UUID, ...]:
        if not isinstance(value, list) or not 1 <= len(value) <= most:
            raise ValueError(f"must be a list of 1 to {most} UUIDs")
        return tuple(item.parse(v) for v in value)

    schema = {
        "type": "array",
        "items": {"type": "string", "format": "uuid"},
        "minItems": 1,
        "maxItems": most,
        "description": description,
    }
    return FieldSpec(parse, schema)


M = TypeVar("M", bound="Message")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """Base of every message type."""

    TYPE: ClassVar[str]
    VERSION: ClassVar[int] = 1
    FIELDS: ClassVar[Mapping[str, FieldSpec]]
    EXAMPLE: ClassVar[Mapping[str, Any]]

    @classmethod
    def from_payload(cls: type[M], payload: Any) -> M:
        """Read a message from its decoded JSON payload, or raise InvalidMessage."""
        if not isinstance(payload, dict):
            raise InvalidMessage("bad_payload", "the payload must be a JSON object")
        version = payload.get("v")
        if version != cls.VERSION:
            raise InvalidMessage(
                "unknown_version", f"{cls.TYPE} v{version!r} is not supported (v{cls.VERSION})"
            )
        unknown = set(payload) - set(cls.FIELDS) - {"v"}
        if unknown:
            raise InvalidMessage("unknown_field", f"{cls.TYPE} has no field {sorted(unknown)[0]!r}")
        values: dict[str, Any] = {}
        for name, spec in cls.FIELDS.items():
            if name not in payload:
                if spec.required:
                    raise InvalidMessage("missing_field", f"{cls.TYPE} needs {name!r}")
                continue
            try:
                values[name] = spec.parse(payload[name])
            except ValueError as exc:
                raise _fail(name, str(exc)) from None
        return cls(**values)

    def to_payload(self) -> dict[str, Any]:
        """The JSON-ready payload (orjson serialises UUIDs and datetimes)."""
        payload: dict[str, Any] = {"v": self.VERSION}
        for name in self.FIELDS:
            value = getattr(self, name)
            if isinstance(value, tuple):
                value = [v.to_payload() if isinstance(v, (Message, RejectedClaim)) else v for v in value]
            payload[name] = value
        return payload

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """The JSON Schema of the payload (``args[0]`` of the envelope)."""
        return {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"urn:issuance:message:{cls.TYPE}:v{cls.VERSION}",
            "title": cls.__name__,
            "description": (cls.__doc__ or "").strip().splitlines()[0],
            "type": "object",
            "additionalProperties": False,
            "required": ["v", *(n for n, s in cls.FIELDS.items() if s.required)],
            "properties": {"v": {"const": cls.VERSION}, **{n: s.schema for n, s in cls.FIELDS.items()}},
            "examples": [dict(cls.EXAMPLE)],
        }

    def business_key(self) -> str:
        """The idempotency key: the same key is the same business event."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class OrderPlaced(Message):
    """An order was placed; the pipeline opens a share (red envelope) for it."""

    TYPE: ClassVar[str] = "order-placed"
    FIELDS: ClassVar[Mapping[str, FieldSpec]] = {
        "order_id": text(ORDER_ID, "the order system's order ID (the idempotency key)"),
        "member_id": optional(integer(1, MAX_MEMBER_ID, "the buyer's member ID (or app_member_id)")),
        "app_member_id": optional(integer(1, MAX_MEMBER_ID, "the buyer's app member ID (or member_id)")),
        "amount_cents": integer(0, MAX_AMOUNT_CENTS, "order amount in minor units"),
        "placed_at": timestamp("when the order was placed"),
        "activity": optional(text(SLUG, "slug of the activity whose envelope this order opens")),
        "redeemed_codes": code_list("coupon codes redeemed in this order"),
        "items": optional(integer(0, MAX_ITEMS, "how many items the order holds (coupons with a minimum)")),
        "store": optional(text(STORE, "the store the order was placed in (coupons limited to stores)")),
    }
    EXAMPLE: ClassVar[Mapping[str, Any]] = {
        "v": 1,
        "order_id": "SO-20261111-000042",
        "member_id": 1001,
        "amount_cents": 25900,
        "placed_at": "2026-11-11T00:00:05+08:00",
        "activity": "double-eleven",
        "redeemed_codes": [],
    }

    order_id: str
    amount_cents: int
    placed_at: datetime
    member_id: int | None = None
    app_member_id: int | None = None
    activity: str | None = None
    redeemed_codes: tuple[str, ...] = ()
    items: int | None = None
    store: str | None = None

    def __post_init__(self) -> None:
        if (self.member_id is None) == (self.app_member_id is None):
            raise InvalidMessage("bad_field", f"{self.TYPE} needs exactly one of member_id and app_member_id")

    def business_key(self) -> str:
        return self.order_id


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ShareOpened(Message):
    """Somebody opened a share link (a funnel and fraud signal)."""

    TYPE: ClassVar[str] = "share-opened"
    FIELDS: ClassVar[Mapping[str, FieldSpec]] = {
        "event_id": uuid_field("client-chosen ID of this open (the idempotency key)"),
        "share_id": uuid_field("the share that was opened"),
        "opened_at": timestamp("when the page was opened"),
    }
    EXAMPLE: ClassVar[Mapping[str, Any]] = {
        "v": 1,
        "event_id": "0b5e7c1e-8d6a-4a8e-9d0c-5d2b7c1f9e01",
        "share_id": "3f0c0e7e-2b2a-5c3e-8f6d-0a9b8c7d6e5f",
        "opened_at": "2026-11-11T00:01:00Z",
    }

    event_id: uuid.UUID
    share_id: uuid.UUID
    opened_at: datetime

    def business_key(self) -> str:
        return str(self.event_id)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ClaimRequested(Message):
    """A mobile number asked for an activity's package."""

    TYPE: ClassVar[str] = "claim-requested"
    FIELDS: ClassVar[Mapping[str, FieldSpec]] = {
        "claim_id": uuid_field("client-chosen claim ID (the idempotency key)"),
        "activity": text(SLUG, "slug of the activity"),
        "phone": text(re.compile(r"^\+?[0-9 ()-]{3,31}$"), "mobile number, E.164 preferred"),
        "requested_at": timestamp("when the member tapped claim; the 24-hour promise runs from here"),
        "share_id": optional(uuid_field("the share the claim came through, if any")),
        "channel": optional(text(CHANNEL, "the channel the claim came through, if not the activity's own")),
    }
    EXAMPLE: ClassVar[Mapping[str, Any]] = {
        "v": 1,
        "claim_id": "9a7b1d2e-3c4f-4a5b-8c6d-7e8f9a0b1c2d",
        "activity": "double-eleven",
        "phone": "+8613800138000",
        "requested_at": "2026-11-11T00:01:30Z",
        "share_id": "3f0c0e7e-2b2a-5c3e-8f6d-0a9b8c7d6e5f",
    }

    claim_id: uuid.UUID
    activity: str
    phone: str
    requested_at: datetime
    share_id: uuid.UUID | None = None
    channel: str | None = None

    def business_key(self) -> str:
        return str(self.claim_id)


MAX_BATCH = 1000


@dataclasses.dataclass(frozen=True, slots=True)
class RejectedClaim:
    """An item of a claim batch that failed validation: the batch's other
    claims go on, this one is dead-lettered with its reason."""

    index: int
    error: InvalidMessage
    payload: Any

    def to_payload(self) -> Any:
        return self.payload


def claim_list(description: str) -> FieldSpec:
    def parse(value: Any) -> tuple[ClaimRequested | RejectedClaim, ...]:
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_BATCH:
            raise ValueError(f"must be a list of 1 to {MAX_BATCH} claim-requested payloads")
        claims: list[ClaimRequested | RejectedClaim] = []
        for n, item in enumerate(value):
            try:
                claims.append(ClaimRequested.from_payload(item))
            except InvalidMessage as exc:
                claims.append(RejectedClaim(n, exc, item))
        return tuple(claims)

    item = {k: v for k, v in ClaimRequested.json_schema().items() if k not in ("$schema", "$id", "examples")}
    schema = {
        "type": "array",
        "items": item,
        "minItems": 1,
        "maxItems": MAX_BATCH,
        "description": description,
    }
    return FieldSpec(parse, schema)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ClaimsRequested(Message):
    """A batch of claims in one message, for producers that batch."""

    TYPE: ClassVar[str] = "claims-requested"
    FIELDS: ClassVar[Mapping[str, FieldSpec]] = {
        "batch_id": uuid_field("producer-chosen ID of this batch"),
        "claims": claim_list("claim-requested payloads, each with its own claim ID"),
    }
    EXAMPLE: ClassVar[Mapping[str, Any]] = {
        "v": 1,
        "batch_id": "5d1c7a9e-0b2f-4c3d-8e4f-6a7b8c9d0e1f",
        "claims": [dict(ClaimRequested.EXAMPLE)],
    }

    batch_id: uuid.UUID
    claims: tuple[ClaimRequested | RejectedClaim, ...]

    @property
    def valid(self) -> tuple[ClaimRequested, ...]:
        return tuple(c for c in self.claims if isinstance(c, ClaimRequested))

    @property
    def rejected(self) -> tuple[RejectedClaim, ...]:
        return tuple(c for c in self.claims if isinstance(c, RejectedClaim))

    def business_key(self) -> str:
        return str(self.batch_id)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CreditRequested(Message):
    """Internal: bound claims are ready to be credited to their wallets."""

    TYPE: ClassVar[str] = "credit-requested"
    FIELDS: ClassVar[Mapping[str, FieldSpec]] = {
        "claim_ids": uuid_list("the bound claims to credit", MAX_BATCH),
    }
    EXAMPLE: ClassVar[Mapping[str, Any]] = {"v": 1, "claim_ids": ["9a7b1d2e-3c4f-4a5b-8c6d-7e8f9a0b1c2d"]}

    claim_ids: tuple[uuid.UUID, ...]

    def business_key(self) -> str:
        # Stable for one set of claims, whatever order a re-send lists them in.
        return hashlib.sha256("".join(sorted(str(c) for c in self.claim_ids)).encode()).hexdigest()


ORDER_STATUS = re.compile(r"^(paid|fulfilled|cancelled|refunded)$")
REFUNDED_BY = re.compile(r"^(buyer|merchant)$")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class OrderStatusChanged(Message):
    """An order was paid, fulfilled (shipped), cancelled before payment, or
    refunded after payment (by the buyer or by the merchant)."""

    TYPE: ClassVar[str] = "order-status-changed"
    FIELDS: ClassVar[Mapping[str, FieldSpec]] = {
        "order_id": text(ORDER_ID, "the order system's order ID"),
        "status": text(ORDER_STATUS, "the new status: paid, fulfilled, cancelled or refunded"),
        "changed_at": timestamp("when the order changed status"),
        "refunded_by": optional(
            text(
                REFUNDED_BY,
                "who refunded (status refunded): buyer (the default) or merchant; a merchant's "
                "refund before fulfilment gives the coupons back, any other refund voids them",
            )
        ),
    }
    EXAMPLE: ClassVar[Mapping[str, Any]] = {
        "v": 1,
        "order_id": "SO-20261111-000042",
        "status": "paid",
        "changed_at": "2026-11-11T00:00:40+08:00",
    }

    order_id: str
    status: str
    changed_at: datetime
    refunded_by: str | None = None

    def __post_init__(self) -> None:
        if self.refunded_by is not None and self.status != "refunded":
            raise InvalidMessage("bad_field", f"{self.TYPE} names refunded_by only with status refunded")

    def business_key(self) -> str:
        # An order reaches each status once.
        return f"{self.order_id}:{self.status}"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MemberRegistered(Message):
    """A member registered on the platform (a pending member becomes real;
    credits held until registration are released)."""

    TYPE: ClassVar[str] = "member-registered"
    FIELDS: ClassVar[Mapping[str, FieldSpec]] = {
        "member_id": optional(integer(1, MAX_MEMBER_ID, "the member ID, when the number is not given")),
        "phone": optional(text(re.compile(r"^\+?[0-9 ()-]{3,31}$"), "mobile number, E.164 preferred")),
        "registered_at": timestamp("when the member registered; held credits' promise runs from here"),
        "app_member_id": optional(
            integer(1, MAX_MEMBER_ID, "the member's ID in the app, linked to it (orders may name it)")
        ),
    }
    EXAMPLE: ClassVar[Mapping[str, Any]] = {
        "v": 1,
        "phone": "+8613800138000",
        "registered_at": "2026-11-12T09:30:00+08:00",
        "app_member_id": 1001,
    }

    registered_at: datetime
    member_id: int | None = None
    phone: str | None = None
    app_member_id: int | None = None

    def __post_init__(self) -> None:
        if (self.member_id is None) == (self.phone is None):
            raise InvalidMessage("bad_field", f"{self.TYPE} needs exactly one of member_id and phone")

    def business_key(self) -> str:
        who = f"m{self.member_id}" if self.member_id is not None else "p" + (self.phone or "")
        return hashlib.sha256(who.encode()).hexdigest()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ShareKnown(Message):
    """Internal, between cells: a share was opened in its referrer's cell.

    The other cells keep it (without its activity, so their reports do not
    count it), so that a claim through it decided there knows the referrer,
    and a referral it leads to reaches the referrer's cell."""

    TYPE: ClassVar[str] = "share-known"
    FIELDS: ClassVar[Mapping[str, FieldSpec]] = {
        "share_id": uuid_field("the share"),
        "order_id": text(ORDER_ID, "the referrer's order the share was opened for"),
        "referrer_member_id": integer(1, MAX_MEMBER_ID, "the referrer (the order's buyer)"),
        "placed_at": timestamp("when the referrer's order was placed"),
    }
    EXAMPLE: ClassVar[Mapping[str, Any]] = {
        "v": 1,
        "share_id": "3f0c0e7e-2b2a-5c3e-8f6d-0a9b8c7d6e5f",
        "order_id": "SO-20261111-000042",
        "referrer_member_id": 1001,
        "placed_at": "2026-11-11T00:00:05+08:00",
    }

    share_id: uuid.UUID
    order_id: str
    referrer_member_id: int
    placed_at: datetime

    def business_key(self) -> str:
        return str(self.share_id)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ReferralCrossed(Message):
    """Internal, between cells: a referral counted (or reversed) in the
    referee's cell, for a referrer of another cell, whose rebates follow."""

    TYPE: ClassVar[str] = "referral-crossed"
    FIELDS: ClassVar[Mapping[str, FieldSpec]] = {
        "referee_member_id": integer(1, MAX_MEMBER_ID, "the referee (a new member of the sending cell)"),
        "referrer_member_id": integer(1, MAX_MEMBER_ID, "the referrer (a member of the receiving cell)"),
        "activity": text(SLUG, "slug of the activity the referee claimed"),
        "share_id": uuid_field("the share the referee claimed through"),
        "claim_id": uuid_field("the referee's claim"),
        "order_id": text(ORDER_ID, "the referee's first paid order"),
        "counted_at": timestamp("when the referral was counted"),
        "reversed_at": optional(timestamp("when the referee's order was refunded or cancelled")),
    }
    EXAMPLE: ClassVar[Mapping[str, Any]] = {
        "v": 1,
        "referee_member_id": 1099511627777,
        "referrer_member_id": 1001,
        "activity": "double-eleven",
        "share_id": "3f0c0e7e-2b2a-5c3e-8f6d-0a9b8c7d6e5f",
        "claim_id": "9a7b1d2e-3c4f-4a5b-8c6d-7e8f9a0b1c2d",
        "order_id": "SO-20261111-000777",
        "counted_at": "2026-11-11T00:20:00Z",
    }

    referee_member_id: int
    referrer_member_id: int
    activity: str
    share_id: uuid.UUID
    claim_id: uuid.UUID
    order_id: str
    counted_at: datetime
    reversed_at: datetime | None = None

    def business_key(self) -> str:
        # A referral is counted once and reversed at most once.
        return f"{self.referee_member_id}:{'reversed' if self.reversed_at else 'counted'}"


MESSAGE_TYPES: dict[str, type[Message]] = {
    m.TYPE: m
    for m in (
        OrderPlaced,
        ShareOpened,
        ClaimRequested,
        ClaimsRequested,
        CreditRequested,
        OrderStatusChanged,
        MemberRegistered,
        ShareKnown,
        ReferralCrossed,
    )
}
PUBLIC_TYPES = (
    "order-placed",
    "share-opened",
    "claim-requested",
    "claims-requested",
    "order-status-changed",
    "member-registered",
)


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_claim_id() -> uuid.UUID:
    """A new claim ID: a time-ordered UUID (version 7, RFC 9562: Unix
    milliseconds, then random bits). A claim's ID keys its row, its codes'
    binding and its wallet entries; IDs that grow with time put those
    inserts and lookups on the indexes' newest pages, where random ones
    touch pages all over ever larger B-trees (most of the database's CPU
    growth per claim as the tables grow; benchmarks/RESULTS.md)."""
    return uuid.UUID(int=uuid6.uuid7().int)
