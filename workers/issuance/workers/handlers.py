"""What each message does, one function per message type.

Handlers take a connection pool and typed messages, run one transaction (a
batch of claims is decided in one, retried whole after a deadlock or a
concurrent delivery of the same claim), and return values saying what
happened. They send nothing: the actors publish follow-up messages only after
the handler's transaction has committed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson
import psycopg
from issuance.shared.db import store
from issuance.shared.domain import (
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
from issuance.shared.errors import ConflictingDuplicate, PermanentError, TransientError
from issuance.shared.settings import Settings
from issuance.shared.wire.messages import ClaimRequested, CreditRequested, OrderPlaced, ShareOpened, utcnow
from psycopg_pool import ConnectionPool

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ClaimOutcome:
    claim_id: uuid.UUID
    # "credited", "bound" (to be credited by the credit step), "refused", or
    # "conflict" (same ID, other payload)
    status: str
    reason: Refusal | None = None
    duplicate: bool = False
    codes: tuple[str, ...] = ()
    # For the gate, set when this call granted the package.
    activity: str | None = None
    group: str | None = None
    digest: bytes | None = None


class _Concurrent(Exception):
    """A concurrent delivery of a claim in this batch committed first."""


RETRYABLE = (_Concurrent, psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)


def payload_digest(message: ClaimRequested) -> bytes:
    return hashlib.sha256(orjson.dumps(message.to_payload(), option=orjson.OPT_SORT_KEYS)).digest()


def handle_claim(
    pool: ConnectionPool, settings: Settings, message: ClaimRequested, *, now: datetime | None = None
) -> ClaimOutcome:
    """Decide one claim (a batch of one). Raises ConflictingDuplicate when
    its ID was recorded with another payload."""
    outcome = handle_claims(pool, settings, [message], now=now)[0]
    if outcome.status == "conflict":
        raise ConflictingDuplicate(f"claim {message.claim_id} was already recorded with another payload")
    return outcome


def handle_claims(
    pool: ConnectionPool,
    settings: Settings,
    messages: Sequence[ClaimRequested],
    *,
    now: datetime | None = None,
) -> list[ClaimOutcome]:
    """Decide a batch of claims in one transaction: refuse each with a reason,
    or bind one code per template of its package. Idempotent on claim IDs;
    outcomes come back in the order of ``messages``."""
    now = now or utcnow()
    for attempt in range(5):
        try:
            with pool.connection() as conn, conn.transaction():
                return _decide(conn, settings, messages, now)
        except RETRYABLE as exc:
            log.info(
                "claim batch of %d retried (%s), attempt %d", len(messages), type(exc).__name__, attempt + 1
            )
    raise TransientError("a claim batch kept colliding with concurrent deliveries")


@dataclasses.dataclass(slots=True)
class _Candidate:
    index: int
    message: ClaimRequested
    activity: store.ActivityRow
    claimed_at: datetime
    digest: bytes
    masked: str


def _existing(claim: store.ClaimRow, digest: bytes) -> ClaimOutcome:
    if claim.payload_digest != digest:
        return ClaimOutcome(claim_id=claim.claim_id, status="conflict", duplicate=True)
    reason = Refusal(claim.reason) if claim.reason else None
    return ClaimOutcome(claim_id=claim.claim_id, status=claim.status, reason=reason, duplicate=True)


def _decide(
    conn: store.Conn, settings: Settings, messages: Sequence[ClaimRequested], now: datetime
) -> list[ClaimOutcome]:
    digests = [payload_digest(m) for m in messages]
    store.lock_claim_ids(conn, [m.claim_id for m in messages])
    recorded = store.claims_by_ids(conn, [m.claim_id for m in messages])
    outcomes: list[ClaimOutcome | None] = [None] * len(messages)
    rows: list[dict[str, Any]] = []
    first_of: dict[uuid.UUID, int] = {}
    activities: dict[str, store.ActivityRow | None] = {}
    candidates: list[_Candidate] = []

    def refuse(i: int, reason: Refusal, **values: Any) -> None:
        m = messages[i]
        rows.append(_row(settings, m, digests[i], status="refused", reason=reason.value, **values))
        outcomes[i] = ClaimOutcome(claim_id=m.claim_id, status="refused", reason=reason)

    for i, message in enumerate(messages):
        if message.claim_id in recorded:
            outcomes[i] = _existing(recorded[message.claim_id], digests[i])
            continue
        if message.claim_id in first_of:  # the same claim twice in one batch
            continue
        first_of[message.claim_id] = i
        if message.activity not in activities:
            activities[message.activity] = store.activity_by_slug(conn, message.activity)
        activity = activities[message.activity]
        if activity is None:
            refuse(i, Refusal.UNKNOWN_ACTIVITY)
            continue
        # The promise and the window run from the moment the member asked,
        # but a publisher's clock is not trusted to be ahead of ours.
        claimed_at = min(message.requested_at, now)
        refusal = window_refusal(activity.rules, claimed_at)
        if refusal is not None:
            refuse(i, refusal, activity_id=activity.activity_id)
            continue
        try:
            e164 = normalize_phone(message.phone, settings.default_region)
        except InvalidPhone:
            refuse(i, Refusal.BAD_PHONE, activity_id=activity.activity_id)
            continue
        digest = phone_digest(e164, settings.phone_key)
        candidates.append(_Candidate(i, message, activity, claimed_at, digest, mask_phone(e164)))

    members = store.lock_members(conn, {c.digest: c.masked for c in candidates}) if candidates else {}
    grants = store.member_grants(conn, sorted(set(members.values())))
    wanted = Counter(c.activity.activity_id for c in candidates)
    slots = {a: store.lock_free_slots(conn, a, n) for a, n in wanted.items()}
    per_template: Counter[int] = Counter()
    for c in candidates:
        per_template.update(t.template_id for t in c.activity.templates)
    pool_codes = {t: store.lock_free_codes(conn, t, n) for t, n in per_template.items()}

    bindings: list[tuple[str, uuid.UUID, int, datetime]] = []
    taken: list[tuple[int, int]] = []
    credit_now: list[uuid.UUID] = []
    for c in candidates:
        member_id = members[c.digest]
        held = grants[member_id]
        activity = c.activity
        values: dict[str, Any] = {"activity_id": activity.activity_id, "member_id": member_id}
        if any(a == activity.activity_id for a, _ in held):
            refuse(c.index, Refusal.ALREADY_RECEIVED, **values)
            continue
        if any(g == activity.exclusivity_group for _, g in held):
            refuse(c.index, Refusal.SIMILAR_ACTIVITY, **values)
            continue
        if not slots[activity.activity_id]:
            refuse(c.index, Refusal.SOLD_OUT, **values)
            continue
        new_member = not held
        templates = templates_to_bind(activity.templates, new_member=new_member)
        if any(not pool_codes[t.template_id] for t in templates):
            refuse(c.index, Refusal.POOL_EMPTY, **values)
            continue
        slot = slots[activity.activity_id].pop()
        taken.append((activity.activity_id, slot))
        expires_at = coupon_expiry(
            c.claimed_at,
            zone=activity.timezone,
            validity_days=activity.validity_days,
            valid_until=activity.valid_until,
        )
        codes = tuple(pool_codes[t.template_id].pop() for t in templates)
        bindings += [(code, c.message.claim_id, member_id, expires_at) for code in codes]
        held.append((activity.activity_id, activity.exclusivity_group))
        # Credited in this transaction unless the credit may have to wait
        # for the member's registration (the credit step decides that).
        status = "credited" if settings.credit_inline and not activity.hold_until_registered else "bound"
        if status == "credited":
            credit_now.append(c.message.claim_id)
        rows.append(
            _row(
                settings,
                c.message,
                digests[c.index],
                status=status,
                group=activity.exclusivity_group,
                slot_no=slot,
                new_member=new_member,
                **values,
            )
        )
        outcomes[c.index] = ClaimOutcome(
            claim_id=c.message.claim_id,
            status=status,
            codes=codes,
            activity=activity.slug,
            group=activity.exclusivity_group,
            digest=c.digest,
        )

    if rows and store.insert_claims(conn, rows) != len(rows):
        raise _Concurrent
    store.take_slots(conn, taken)
    store.bind_codes(conn, bindings)
    if credit_now:
        store.write_wallet(conn, credit_now)
    for i, message in enumerate(messages):
        if outcomes[i] is None:  # a repeat, within the batch, of a claim decided above
            first = outcomes[first_of[message.claim_id]]
            assert first is not None
            same = digests[i] == digests[first_of[message.claim_id]]
            outcomes[i] = dataclasses.replace(
                first, duplicate=True, status=first.status if same else "conflict", digest=None, codes=()
            )
    return [o for o in outcomes if o is not None]


def _row(settings: Settings, message: ClaimRequested, digest: bytes, **values: Any) -> dict[str, Any]:
    return {
        "claim_id": message.claim_id,
        "activity_slug": message.activity,
        "share_id": message.share_id,
        "payload_digest": digest,
        "requested_at": message.requested_at,
        "deadline": credit_deadline(message.requested_at, settings.credit_promise_seconds),
        "new_member": False,
        **values,
    }


def handle_credit(pool: ConnectionPool, message: CreditRequested) -> list[tuple[uuid.UUID, datetime]]:
    """Credit the bound claims of a credit message to their wallets, exactly
    once. Returns the (claim, requested at) of each claim this call credited:
    empty for a duplicate delivery."""
    with pool.connection() as conn, conn.transaction():
        _, credited = store.credit_claims(conn, message.claim_ids)
        if len(credited) < len(message.claim_ids):
            known = store.claims_by_ids(conn, message.claim_ids)
            unknown = [str(c) for c in message.claim_ids if c not in known]
            if unknown and not credited:
                raise UnknownClaim(f"no claims {', '.join(unknown[:5])}")
        return credited


class UnknownClaim(PermanentError):
    """A credit was requested for a claim that was never recorded."""


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
