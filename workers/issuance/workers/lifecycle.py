"""What happens to coupons after issuance, one function per event: orders
redeeming, returning and voiding coupons, orders paid or refunded
(referrals counted and reversed, rebates written and taken back),
members registering (held credits released), and the credit hold itself.

Like issuance.workers.handlers, each function works inside the caller's
transaction (one per message) and sends nothing; the unit of work sends
follow-ups after the commit. The pool-level functions run one in a
transaction of its own (the tests call them). Illegal transitions
asked for by a message are kept in ``lifecycle_refusals`` with their reason
and acknowledged: retrying cannot make them legal.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Sequence
from datetime import datetime

from issuance.shared.db import cells as cells_db
from issuance.shared.db import checkout_store as ks
from issuance.shared.db import coupon_store as cs
from issuance.shared.db import members, store
from issuance.shared.db import refund_store as rs
from issuance.shared.db.store import Conn
from issuance.shared.domain import InvalidPhone, coupon_expiry, mask_phone, normalize_phone, phone_digests
from issuance.shared.domain.cells import route_slot
from issuance.shared.domain.checkout import Cart, choose
from issuance.shared.domain.coupons import (
    LifecycleRefusal,
    OrderStep,
    TransitionRefused,
    is_self_referral,
    order_step,
    rebates_due,
)
from issuance.shared.domain.refunds import (
    RELEASED_CANCELLED,
    RELEASED_REFUNDED,
    CouponFate,
    coupon_fate,
    rebate_changes,
    rebate_reversal,
    referral_refusal,
)
from issuance.shared.errors import InvalidMessage, TransientError
from issuance.shared.settings import Settings, require_phone_keys
from issuance.shared.wire.messages import MemberRegistered, OrderPlaced, OrderStatusChanged, utcnow
from issuance.workers.runtime import UnitOfWork
from psycopg_pool import ConnectionPool

log = logging.getLogger(__name__)


DEFAULT_MIN_REFERRAL_CENTS = Settings().referral_min_order_cents


class OrderNotYetKnown(TransientError):
    """A status change arrived before its order-placed event: retried later."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class OrderOutcome:
    recorded: bool
    used: tuple[str, ...] = ()
    refused: tuple[tuple[str, LifecycleRefusal], ...] = ()
    discount_cents: int = 0


def record_order(pool: ConnectionPool, message: OrderPlaced) -> OrderOutcome:
    """:func:`record_order_in` in a transaction of its own."""
    return UnitOfWork(pool).run(lambda conn: record_order_in(conn, message))


def record_order_in(conn: Conn, message: OrderPlaced) -> OrderOutcome:
    """Record a placed order and redeem the coupons it lists (each becomes
    used, with the order and its discount). Idempotent on the order ID."""
    event = f"order-placed:{message.order_id}"
    member_id = order_member(conn, message)
    inserted = cs.insert_order(
        conn,
        order_id=message.order_id,
        member_id=member_id,
        activity=message.activity,
        amount_cents=message.amount_cents,
        placed_at=message.placed_at,
    )
    if not inserted:
        existing = cs.order_by_id(conn, message.order_id)
        assert existing is not None
        if (existing.member_id, existing.amount_cents) != (member_id, message.amount_cents):
            cs.record_refusal(
                conn,
                event_key=event,
                subject=message.order_id,
                reason=LifecycleRefusal.ORDER_CONFLICT,
                detail="member or amount differ from the recorded order",
            )
        return OrderOutcome(recorded=False)
    if not message.redeemed_codes:
        return OrderOutcome(recorded=True)
    # The checkout's rules, on the cart the event describes; the codes are
    # locked in code order, so two orders naming the same codes cannot deadlock.
    cart = Cart(
        amount_cents=message.amount_cents, items=message.items or 0, at=message.placed_at, store=message.store
    )
    coupons = ks.coupons_for_update(conn, message.redeemed_codes)
    chosen = choose(message.redeemed_codes, coupons, cart, member_id=member_id, order_id=message.order_id)
    for code, reason in chosen.refused:
        cs.record_refusal(conn, event_key=event, subject=code, reason=reason, detail=reason.text)
        log.info("order %s: coupon %s refused (%s)", message.order_id, code, reason.value)
    for code, off in chosen.lines:
        cs.use_coupon(conn, code=code, order_id=message.order_id, at=message.placed_at, discount_cents=off)
    if chosen.discount_cents:
        cs.set_order_discount(conn, message.order_id, chosen.discount_cents)
    return OrderOutcome(
        recorded=True,
        used=tuple(sorted(code for code, _ in chosen.lines)),
        refused=chosen.refused,
        discount_cents=chosen.discount_cents,
    )


class MemberNotYetKnown(TransientError):
    """An order names an app member ID no member-registered event has linked
    yet: retried later."""


def order_member(conn: Conn, message: OrderPlaced) -> int:
    """The member an order-placed event names, by either of its IDs."""
    member_id = members.buyer(conn, member_id=message.member_id, app_member_id=message.app_member_id)
    if member_id is None:
        raise MemberNotYetKnown(f"app member {message.app_member_id} is not linked to a member yet")
    return member_id


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StatusOutcome:
    outcome: str  # "ok", "duplicate" or "refused"
    reason: LifecycleRefusal | None = None
    returned: int = 0
    voided: int = 0
    referral: bool = False
    referral_reversed: bool = False
    rebates: tuple[int, ...] = ()
    rebates_reversed: tuple[int, ...] = ()


def handle_order_status(
    pool: ConnectionPool,
    message: OrderStatusChanged,
    *,
    now: datetime | None = None,
    min_referral_cents: int = DEFAULT_MIN_REFERRAL_CENTS,
) -> StatusOutcome:
    """:func:`move_order` in a transaction of its own."""
    return UnitOfWork(pool).run(
        lambda conn: move_order(conn, message, now=now, min_referral_cents=min_referral_cents)
    )


def move_order(
    conn: Conn,
    message: OrderStatusChanged,
    *,
    now: datetime | None = None,
    min_referral_cents: int = DEFAULT_MIN_REFERRAL_CENTS,
) -> StatusOutcome:
    """Move an order: paid (a referral may count), fulfilled, cancelled
    before payment or refunded after it. The coupons it used are returned or
    voided (issuance.shared.domain.refunds.coupon_fate); a refund or a
    cancellation reverses the referral the order counted for, and the
    rebates of the referrers concerned are settled again."""
    now = now or utcnow()
    order = cs.order_by_id(conn, message.order_id, lock=True)
    if order is None:
        raise OrderNotYetKnown(f"order {message.order_id} is not recorded yet")
    try:
        step = order_step(order.status, message.status)
    except TransitionRefused as exc:
        cs.record_refusal(
            conn,
            event_key=f"order-status:{message.business_key()}",
            subject=message.order_id,
            reason=exc.reason,
            detail=f"{order.status} -> {message.status}: {exc.reason.text}",
        )
        return StatusOutcome(outcome="refused", reason=exc.reason)
    if step is OrderStep.DUPLICATE:
        return StatusOutcome(outcome="duplicate")
    refunded_by = (message.refunded_by or "buyer") if message.status == "refunded" else None
    fate = coupon_fate(order_status=order.status, new_status=message.status, refunded_by=refunded_by)
    rs.move_order(conn, message.order_id, message.status, message.changed_at, refunded_by=refunded_by)
    moved = 0
    if fate is not None:
        reason = RELEASED_CANCELLED if message.status == "cancelled" else RELEASED_REFUNDED
        moved = rs.settle_coupons(conn, message.order_id, fate, at=now, reason=reason)
    returned, voided = (moved, 0) if fate is CouponFate.RETURN else (0, moved)
    if message.status == "paid":
        counted, written = _count_referral(conn, order, now, min_referral_cents)
        # The referrer's own order paid: its share's referrals may earn now.
        more = _settle_through(conn, order.order_id, now)
        return StatusOutcome(
            outcome="ok", referral=counted, rebates=written + more.written, rebates_reversed=more.reversed
        )
    if message.status in ("cancelled", "refunded"):
        reversed_referral, settled = _unwind(conn, order.order_id, now)
        return StatusOutcome(
            outcome="ok",
            returned=returned,
            voided=voided,
            referral_reversed=reversed_referral,
            rebates=settled.written,
            rebates_reversed=settled.reversed,
        )
    return StatusOutcome(outcome="ok")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Settled:
    written: tuple[int, ...] = ()
    reversed: tuple[int, ...] = ()

    def __add__(self, other: Settled) -> Settled:
        return Settled(written=self.written + other.written, reversed=self.reversed + other.reversed)


def _unwind(conn: Conn, order_id: str, now: datetime) -> tuple[bool, Settled]:
    """An order cancelled or refunded: the referral it counted for (as the
    referee's order) is reversed, and the referrals through its share (as
    the referrer's own order) stop earning; rebates follow."""
    settled = Settled()
    key = rs.reverse_referral(conn, order_id, now)
    if key is not None:
        log.info("order %s refunded: its referral of member %s is reversed", order_id, key.referrer_member_id)
        settled = settle_rebates(conn, key.referrer_member_id, key.activity_id, now)
    return key is not None, settled + _settle_through(conn, order_id, now)


def _settle_through(conn: Conn, order_id: str, now: datetime) -> Settled:
    """Settle the rebates of the referrer whose share was made from ``order_id``."""
    key = rs.referrals_through_order(conn, order_id)
    if key is None:
        return Settled()
    return settle_rebates(conn, key.referrer_member_id, key.activity_id, now)


def _count_referral(
    conn: Conn, order: cs.OrderRow, now: datetime, min_referral_cents: int
) -> tuple[bool, tuple[int, ...]]:
    """A new member who claimed through a share, paying a first order of at
    least the minimum after that claim: one successful referral for the
    share's buyer. Every K of them earn the buyer a rebate, each written once."""
    source = cs.referral_source(conn, order.member_id)
    if source is None or order.placed_at < source.requested_at:
        return False, ()
    refusal = referral_refusal(
        order_status="paid", amount_cents=order.amount_cents, min_amount_cents=min_referral_cents
    )
    if refusal is not None:
        cs.record_refusal(
            conn,
            event_key=f"referral:{order.order_id}",
            subject=str(order.member_id),
            reason=refusal,
            detail=f"order of {order.amount_cents} below the minimum of {min_referral_cents}",
        )
        return False, ()
    if rs.other_qualifying_orders(conn, order.member_id, order.order_id, min_referral_cents):
        return False, ()
    if is_self_referral(
        referrer_id=source.referrer_member_id,
        referee_id=order.member_id,
        referrer_digest=source.referrer_digest,
        referee_digest=source.referee_digest,
    ):
        cs.record_refusal(
            conn,
            event_key=f"referral:{order.order_id}",
            subject=str(order.member_id),
            reason=LifecycleRefusal.SELF_REFERRAL,
        )
        return False, ()
    cs.lock_referrer(conn, source.referrer_member_id)
    if not cs.insert_referral(conn, referee=order.member_id, source=source, order_id=order.order_id):
        return False, ()
    return True, settle_rebates(conn, source.referrer_member_id, source.activity_id, now).written


def settle_rebates(conn: Conn, referrer: int, activity_id: int, now: datetime) -> Settled:
    """Bring the referrer's standing rebates in the activity to what its
    earning referrals (not reversed, through a paid order of its own) are
    due: write and credit the missing ones (an amount by its row, a coupon by
    binding a code of the rebate template), take back the newest excess ones
    (issuance.shared.domain.refunds.rebate_reversal)."""
    cs.lock_referrer(conn, referrer)
    terms = cs.rebate_terms(conn, activity_id)
    if terms.amount_cents is None and terms.template_id is None:
        return Settled()
    standing = rs.standing_rebates(conn, referrer, activity_id)
    earned = rebates_due(rs.earning_referrals(conn, referrer, activity_id), terms.every)
    to_write, to_reverse = rebate_changes(earned=earned, standing=len(standing))
    taken_back = []
    for rebate in reversed(standing[len(standing) - to_reverse :] if to_reverse else []):
        reversal = rebate_reversal(amount_cents=rebate.amount_cents, code_status=rebate.code_status)
        rs.reverse_rebate(conn, rebate, reversal, now)
        taken_back.append(rebate.rebate_no)
        log.warning(
            "rebate %s of member %s taken back (%s): its referrals no longer earn it",
            rebate.rebate_no,
            referrer,
            reversal.value,
        )
    first = len(standing) + 1
    written = [
        number
        for number in range(first, first + to_write)
        if _write_rebate(conn, referrer, activity_id, number, terms=terms, now=now)
    ]
    return Settled(written=tuple(written), reversed=tuple(taken_back))


def _write_rebate(
    conn: Conn, referrer: int, activity_id: int, number: int, *, terms: cs.RebateTerms, now: datetime
) -> bool:
    rebate_id = cs.insert_rebate(
        conn, referrer=referrer, activity_id=activity_id, rebate_no=number, terms=terms, now=now
    )
    if rebate_id is None:
        return False
    if terms.amount_cents is None and terms.template_id is not None:
        expires_at = coupon_expiry(
            now, zone=terms.timezone, validity_days=terms.validity_days, valid_until=terms.valid_until
        )
        code = cs.bind_rebate_code(
            conn,
            rebate_id=rebate_id,
            member=referrer,
            template=terms.template_id,
            now=now,
            expires_at=expires_at,
        )
        if code is None:
            log.warning("rebate %s of member %s owed: the rebate template's pool is empty", number, referrer)
    return True


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CreditPlan:
    """What the credit step may do now: the claims to credit, and for those
    released from a hold, when their promise started (registration)."""

    ready: list[uuid.UUID]
    promise_from: dict[uuid.UUID, datetime]


def prepare_credit(pool: ConnectionPool, claim_ids: Sequence[uuid.UUID]) -> CreditPlan:
    """:func:`plan_credit` in a transaction of its own."""
    return UnitOfWork(pool).run(lambda conn: plan_credit(conn, claim_ids))


def plan_credit(conn: Conn, claim_ids: Sequence[uuid.UUID]) -> CreditPlan:
    """Hold the credits of claims whose activity waits for registration while
    their member is pending; the others may be credited now."""
    held = cs.hold_credits(conn, list(claim_ids))
    released = cs.promise_starts(conn, list(claim_ids))
    return CreditPlan(ready=[c for c in claim_ids if c not in held], promise_from=released)


def handle_member_registered(
    pool: ConnectionPool, settings: Settings, message: MemberRegistered, *, now: datetime | None = None
) -> list[uuid.UUID]:
    """:func:`register_member` in a transaction of its own."""
    return UnitOfWork(pool).run(lambda conn: register_member(conn, settings, message, now=now))


def register_member(
    conn: Conn, settings: Settings, message: MemberRegistered, *, now: datetime | None = None
) -> list[uuid.UUID]:
    """Mark the member registered and release its held credits, whose promise
    now runs from registration. Returns the claims to credit."""
    now = now or utcnow()
    digest_masked = None
    if message.phone is not None:
        try:
            e164 = normalize_phone(message.phone, settings.default_region)
        except InvalidPhone as exc:
            raise InvalidMessage("bad_phone", str(exc)) from None
        keys = require_phone_keys(settings)
        digests = phone_digests(e164, keys.secrets)
        store.rekey_members(conn, keys.current_id, [digests])  # found under an older key: re-keyed
        digest_masked = (digests[0][1], mask_phone(e164), keys.current_id)
    member = cs.register_member(
        conn,
        registered_at=message.registered_at,
        member_id=message.member_id,
        digest_masked=digest_masked,
    )
    if digest_masked is not None:
        cells_db.record_ring_slots(conn, {digest_masked[0]: route_slot(e164)})
    if member is None:
        cs.record_refusal(
            conn,
            event_key=f"member-registered:{message.business_key()}",
            subject=str(message.member_id),
            reason=LifecycleRefusal.UNKNOWN_MEMBER,
        )
        return []
    member_id, registered_at = member
    if message.app_member_id is not None:
        _link_app_member(conn, message, member_id, message.app_member_id)
    return cs.release_held(
        conn,
        member_id=member_id,
        registered_at=registered_at,
        promise_seconds=settings.credit_promise_seconds,
        now=now,
    )


def _link_app_member(conn: Conn, message: MemberRegistered, member_id: int, app_member_id: int) -> None:
    """Link the app's member ID to the member; a conflict is kept as a
    refusal (the registration itself stands)."""
    link = members.link_app_member(conn, member_id=member_id, app_member_id=app_member_id)
    if link is members.Link.CONFLICT:
        cs.record_refusal(
            conn,
            event_key=f"member-registered:{message.business_key()}",
            subject=f"app:{app_member_id}",
            reason=LifecycleRefusal.APP_MEMBER_CONFLICT,
            detail=f"member {member_id}: {LifecycleRefusal.APP_MEMBER_CONFLICT.text}",
        )
