"""What each message does, one function per message type.

Handlers take a connection pool and a typed message, run one transaction (two
when a claim is refused after work that must be rolled back), and return a
value saying what happened. They send nothing: the actors publish follow-up
messages only after the handler's transaction has committed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import uuid
from datetime import datetime

import orjson
from psycopg_pool import ConnectionPool

from shared import store
from shared.domain import (
    InvalidPhone,
    Refusal,
    coupon_expiry,
    credit_deadline,
    mask_phone,
    normalize_phone,
    phone_digest,
    share_id_for,
    templates_to_bind,
    window_refusal,
)
from shared.errors import ConflictingDuplicate, PermanentError
from shared.messages import ClaimRequested, CreditRequested, OrderPlaced, ShareOpened, utcnow
from shared.settings import Settings

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ClaimOutcome:
    claim_id: uuid.UUID
    status: str  # "bound", "credited" or "refused"
    reason: Refusal | None = None
    duplicate: bool = False
    codes: tuple[str, ...] = ()
    # For the gate, set when this call granted the package.
    activity: str | None = None
    group: str | None = None
    digest: bytes | None = None


class _Refused(Exception):
    def __init__(self, reason: Refusal, **recorded: object) -> None:
        super().__init__(reason.value)
        self.reason = reason
        self.recorded = recorded


class _AlreadyRecorded(Exception):
    """A concurrent delivery of the same claim committed first."""


def payload_digest(message: ClaimRequested) -> bytes:
    return hashlib.sha256(orjson.dumps(message.to_payload(), option=orjson.OPT_SORT_KEYS)).digest()


def handle_claim(
    pool: ConnectionPool, settings: Settings, message: ClaimRequested, *, now: datetime | None = None
) -> ClaimOutcome:
    """Decide a claim: refuse it with a reason, or bind one code per template
    of the package. Idempotent on the claim ID."""
    digest = payload_digest(message)
    now = now or utcnow()
    try:
        with pool.connection() as conn, conn.transaction():
            return _grant(conn, settings, message, digest, now)
    except _Refused as refused:
        with pool.connection() as conn, conn.transaction():
            member = refused.recorded.pop("member", None)
            if isinstance(member, tuple):
                # The member created in the rolled-back attempt is created again.
                refused.recorded["member_id"], _ = store.lock_member(conn, *member)
            recorded = store.insert_claim(
                conn,
                claim_id=message.claim_id,
                activity_slug=message.activity,
                share_id=message.share_id,
                status="refused",
                reason=refused.reason.value,
                payload_digest=digest,
                requested_at=message.requested_at,
                deadline=credit_deadline(message.requested_at, settings.credit_promise_seconds),
                **refused.recorded,
            )
            if recorded:
                return ClaimOutcome(claim_id=message.claim_id, status="refused", reason=refused.reason)
            return _existing(conn, message.claim_id, digest)
    except _AlreadyRecorded:
        with pool.connection() as conn, conn.transaction():
            return _existing(conn, message.claim_id, digest)


def _existing(conn: store.Conn, claim_id: uuid.UUID, digest: bytes) -> ClaimOutcome:
    claim = store.claim_by_id(conn, claim_id)
    assert claim is not None, "an already-recorded claim must exist"
    if claim.payload_digest != digest:
        raise ConflictingDuplicate(f"claim {claim_id} was already recorded with another payload")
    reason = Refusal(claim.reason) if claim.reason else None
    return ClaimOutcome(claim_id=claim_id, status=claim.status, reason=reason, duplicate=True)


def _grant(
    conn: store.Conn, settings: Settings, message: ClaimRequested, digest: bytes, now: datetime
) -> ClaimOutcome:
    if store.claim_by_id(conn, message.claim_id) is not None:
        return _existing(conn, message.claim_id, digest)

    activity = store.activity_by_slug(conn, message.activity)
    if activity is None:
        raise _Refused(Refusal.UNKNOWN_ACTIVITY)
    # The promise and the window run from the moment the member asked, but a
    # publisher's clock is not trusted to be ahead of ours.
    claimed_at = min(message.requested_at, now)
    refusal = window_refusal(activity.rules, claimed_at)
    if refusal is not None:
        raise _Refused(refusal, activity_id=activity.activity_id)
    try:
        e164 = normalize_phone(message.phone, settings.default_region)
    except InvalidPhone:
        raise _Refused(Refusal.BAD_PHONE, activity_id=activity.activity_id) from None

    phone_key = phone_digest(e164, settings.phone_key)
    member_id, _ = store.lock_member(conn, phone_key, mask_phone(e164))
    has_any, same_activity, same_group = store.member_history(
        conn, member_id, activity.activity_id, activity.exclusivity_group
    )
    recorded: dict[str, object] = {
        "activity_id": activity.activity_id,
        "member": (phone_key, mask_phone(e164)),
    }
    if same_activity:
        raise _Refused(Refusal.ALREADY_RECEIVED, **recorded)
    if same_group:
        raise _Refused(Refusal.SIMILAR_ACTIVITY, **recorded)
    slot = store.take_slot(conn, activity.activity_id)
    if slot is None:
        raise _Refused(Refusal.SOLD_OUT, **recorded)

    new_member = not has_any
    inserted = store.insert_claim(
        conn,
        claim_id=message.claim_id,
        activity_slug=activity.slug,
        activity_id=activity.activity_id,
        group=activity.exclusivity_group,
        member_id=member_id,
        share_id=message.share_id,
        slot_no=slot,
        status="bound",
        new_member=new_member,
        payload_digest=digest,
        requested_at=message.requested_at,
        deadline=credit_deadline(message.requested_at, settings.credit_promise_seconds),
    )
    if not inserted:
        raise _AlreadyRecorded
    expires_at = coupon_expiry(
        claimed_at,
        zone=activity.timezone,
        validity_days=activity.validity_days,
        valid_until=activity.valid_until,
    )
    codes = []
    for template in templates_to_bind(activity.templates, new_member=new_member):
        code = store.bind_code(
            conn,
            template_id=template.template_id,
            claim_id=message.claim_id,
            member_id=member_id,
            expires_at=expires_at,
        )
        if code is None:
            raise _Refused(Refusal.POOL_EMPTY, **recorded)
        codes.append(code)
    return ClaimOutcome(
        claim_id=message.claim_id,
        status="bound",
        codes=tuple(codes),
        activity=activity.slug,
        group=activity.exclusivity_group,
        digest=phone_key,
    )


class UnknownClaim(PermanentError):
    """A credit was requested for a claim that was never recorded."""


def handle_credit(pool: ConnectionPool, message: CreditRequested) -> tuple[int, datetime | None]:
    """Credit a bound claim's codes to the wallet, exactly once. Returns the
    number of entries written by this call (0 for a duplicate) and, when it
    credited, the claim's request time (for the latency histogram)."""
    with pool.connection() as conn, conn.transaction():
        claim = store.claim_by_id(conn, message.claim_id, lock=True)
        if claim is None:
            raise UnknownClaim(f"no claim {message.claim_id}")
        if claim.status != "bound":
            return 0, None
        written = store.credit_claim(conn, message.claim_id)
        requested = conn.execute("SELECT requested_at FROM claims WHERE claim_id = %s", (message.claim_id,))
        row = requested.fetchone()
        return written, row[0] if row else None


def handle_order_placed(pool: ConnectionPool, message: OrderPlaced) -> bool:
    """Open the order's share. Returns False when it was already open."""
    with pool.connection() as conn, conn.transaction():
        return store.open_share(
            conn,
            share_id=share_id_for(message.order_id),
            order_id=message.order_id,
            activity=message.activity,
            referrer=message.member_id,
            placed_at=message.placed_at,
        )


def handle_share_opened(pool: ConnectionPool, message: ShareOpened) -> bool:
    """Record that a share was opened. Returns False for a duplicate."""
    with pool.connection() as conn, conn.transaction():
        return store.record_share_open(
            conn, event_id=message.event_id, share_id=message.share_id, opened_at=message.opened_at
        )
