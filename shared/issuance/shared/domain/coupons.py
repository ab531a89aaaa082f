"""The rules of coupons after issuance and of referral rebates, as plain
functions (like issuance.shared.domain, this module imports no database, broker or
network code; a unit test checks it).

Coupon states: ``unused`` (bound to a member), ``used`` (redeemed in an
order), ``expired`` (swept after its expiry), ``cancelled`` (by an
operator), ``voided`` (final: refunded after payment, or a rebate taken
back; see issuance.shared.domain.refunds). Orders: ``placed`` -> ``paid``
[-> ``fulfilled``] -> ``refunded``, or ``placed`` -> ``cancelled``. Every
transition is idempotent: asking for the state a thing is already in
changes nothing; an illegal one is refused with a stable reason.
"""

from __future__ import annotations

import dataclasses
import enum
from datetime import datetime


class LifecycleRefusal(enum.StrEnum):
    """Why a coupon, order or referral transition was refused (stored)."""

    UNKNOWN_CODE = "unknown_code"
    NOT_ISSUED = "not_issued"
    NOT_OWNER = "not_owner"
    NOT_CREDITED = "not_credited"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    ALREADY_USED = "already_used"
    BELOW_THRESHOLD = "below_threshold"
    UNKNOWN_ORDER = "unknown_order"
    ORDER_CONFLICT = "order_conflict"
    PAID_ORDER_NOT_CANCELLABLE = "paid_order_not_cancellable"
    NOT_PAID = "not_paid"
    ORDER_CLOSED = "order_closed"
    UNKNOWN_MEMBER = "unknown_member"
    SELF_REFERRAL = "self_referral"
    NOT_YET_VALID = "not_yet_valid"
    HELD_BY_ANOTHER_ORDER = "held_by_another_order"
    RESERVATION_EXPIRED = "reservation_expired"
    ORDER_ALREADY_PAID = "order_already_paid"
    VOIDED = "voided"
    # The coupon's rules (issuance.shared.domain.checkout): scope, stacking,
    # per-person count.
    WRONG_STORE = "wrong_store"
    NO_ELIGIBLE_ITEMS = "no_eligible_items"
    TOO_FEW_ITEMS = "too_few_items"
    MEMBER_LEVEL_TOO_LOW = "member_level_too_low"
    NOT_STACKABLE = "not_stackable"
    EXCLUDED_BY_PROMOTION = "excluded_by_promotion"
    PER_PERSON_LIMIT = "per_person_limit"
    APP_MEMBER_CONFLICT = "app_member_conflict"
    # Redemptions without an order (write-offs) and shared promo codes.
    WRITTEN_OFF = "written_off"
    NEEDS_AN_ORDER = "needs_an_order"
    PROMO_EXHAUSTED = "promo_exhausted"

    @property
    def text(self) -> str:
        return REFUSAL_TEXT[self]


REFUSAL_TEXT: dict[LifecycleRefusal, str] = {
    LifecycleRefusal.UNKNOWN_CODE: "no such coupon code",
    LifecycleRefusal.NOT_ISSUED: "the code was never issued to a member",
    LifecycleRefusal.NOT_OWNER: "the coupon belongs to another member",
    LifecycleRefusal.NOT_CREDITED: "the coupon is not in the member's wallet yet",
    LifecycleRefusal.EXPIRED: "the coupon has expired",
    LifecycleRefusal.CANCELLED: "the coupon was cancelled",
    LifecycleRefusal.ALREADY_USED: "the coupon was already used in another order",
    LifecycleRefusal.BELOW_THRESHOLD: "the order does not reach the coupon's spend threshold",
    LifecycleRefusal.UNKNOWN_ORDER: "no such order",
    LifecycleRefusal.ORDER_CONFLICT: "the order ID was already recorded with other values",
    LifecycleRefusal.PAID_ORDER_NOT_CANCELLABLE: (
        "a paid order is refunded, not cancelled: its coupons stay used"
    ),
    LifecycleRefusal.NOT_PAID: "only a paid order can be refunded",
    LifecycleRefusal.ORDER_CLOSED: "the order is already cancelled or refunded",
    LifecycleRefusal.UNKNOWN_MEMBER: "no such member",
    LifecycleRefusal.SELF_REFERRAL: "a member cannot refer themselves",
    LifecycleRefusal.NOT_YET_VALID: "the coupon is not valid yet",
    LifecycleRefusal.HELD_BY_ANOTHER_ORDER: "the coupon is reserved by another order",
    LifecycleRefusal.RESERVATION_EXPIRED: "the reservation timed out and was released",
    LifecycleRefusal.ORDER_ALREADY_PAID: "the order is paid: its coupons are redeemed, not released",
    LifecycleRefusal.VOIDED: "the coupon was voided by a refund",
    LifecycleRefusal.WRONG_STORE: "the coupon is not valid in this store",
    LifecycleRefusal.NO_ELIGIBLE_ITEMS: "no item of the order is among the coupon's products or categories",
    LifecycleRefusal.TOO_FEW_ITEMS: "the order has fewer eligible items than the coupon requires",
    LifecycleRefusal.MEMBER_LEVEL_TOO_LOW: "the coupon needs a higher member level",
    LifecycleRefusal.NOT_STACKABLE: "the coupon cannot be combined with other coupons",
    LifecycleRefusal.EXCLUDED_BY_PROMOTION: "the coupon cannot be combined with the order's other promotions",
    LifecycleRefusal.PER_PERSON_LIMIT: "the member has already used as many coupons of this kind as allowed",
    LifecycleRefusal.APP_MEMBER_CONFLICT: "the app's member ID is already linked to another member",
    LifecycleRefusal.WRITTEN_OFF: "the code was already redeemed without an order (written off)",
    LifecycleRefusal.NEEDS_AN_ORDER: (
        "only gift coupons and partner or printed codes are written off; this coupon is used in an order"
    ),
    LifecycleRefusal.PROMO_EXHAUSTED: "the promo code has been used as many times as allowed",
}


class TransitionRefused(ValueError):
    """An illegal transition, with its stable reason."""

    def __init__(self, reason: LifecycleRefusal, subject: str = "") -> None:
        super().__init__(f"{subject}: {reason.text}" if subject else reason.text)
        self.reason = reason
        self.subject = subject


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CouponView:
    """What the redemption rule needs to know about one code."""

    code: str
    status: str
    member_id: int | None
    order_id: str | None
    expires_at: datetime | None
    credited: bool
    kind: str
    value: int
    threshold_cents: int
    # The start of the activity's fixed validity window, when it has one.
    valid_from: datetime | None = None


def use_refusal(
    coupon: CouponView, *, member_id: int, order_id: str, at: datetime
) -> LifecycleRefusal | None:
    """May ``member_id`` redeem ``coupon`` in ``order_id`` at ``at``? None
    means yes (or that it already did, in this very order: idempotent)."""
    if coupon.status == "used" and coupon.order_id == order_id:
        return None
    refusal = holder_refusal(status=coupon.status, owner=coupon.member_id, member_id=member_id)
    if refusal is None and coupon.status == "used":
        refusal = LifecycleRefusal.ALREADY_USED
    if refusal is None:
        refusal = time_refusal(
            status=coupon.status,
            expires_at=coupon.expires_at,
            valid_from=coupon.valid_from,
            credited=coupon.credited,
            at=at,
        )
    return refusal


def holder_refusal(*, status: str, owner: int | None, member_id: int) -> LifecycleRefusal | None:
    """Is the coupon issued, ``member_id``'s, and not cancelled? The rule
    both the order events and checkout apply."""
    if status == "written_off":
        return LifecycleRefusal.WRITTEN_OFF
    if status == "available" or owner is None:
        return LifecycleRefusal.NOT_ISSUED
    if owner != member_id:
        return LifecycleRefusal.NOT_OWNER
    if status == "cancelled":
        return LifecycleRefusal.CANCELLED
    if status == "voided":
        return LifecycleRefusal.VOIDED
    return None


def writeoff_refusal(
    *, status: str, kind: str, expires_at: datetime | None, held: bool, at: datetime
) -> LifecycleRefusal | None:
    """May a code be redeemed without an order (written off) at ``at``? A
    partner's or printed code never bound to a member (``available``) may,
    and so may a gift coupon in a wallet; a coupon of any other kind is used
    in an order. A code already used, voided, cancelled, expired or held by
    an order is refused with the reason. (Written off already: the caller
    answers with the first write-off, idempotently.)"""
    refusals = {
        "used": LifecycleRefusal.ALREADY_USED,
        "voided": LifecycleRefusal.VOIDED,
        "cancelled": LifecycleRefusal.CANCELLED,
        "expired": LifecycleRefusal.EXPIRED,
        "written_off": LifecycleRefusal.WRITTEN_OFF,
    }
    if status in refusals:
        return refusals[status]
    if expires_at is not None and expires_at <= at:
        return LifecycleRefusal.EXPIRED
    if status == "unused" and kind != "gift":
        return LifecycleRefusal.NEEDS_AN_ORDER
    if held:
        return LifecycleRefusal.HELD_BY_ANOTHER_ORDER
    return None


def time_refusal(
    *, status: str, expires_at: datetime | None, valid_from: datetime | None, credited: bool, at: datetime
) -> LifecycleRefusal | None:
    """Does the coupon apply at ``at``: not expired, already valid, and in
    the wallet? The rule both the order events and checkout apply."""
    if status == "expired" or (expires_at is not None and expires_at <= at):
        return LifecycleRefusal.EXPIRED
    if valid_from is not None and at < valid_from:
        return LifecycleRefusal.NOT_YET_VALID
    if not credited:
        return LifecycleRefusal.NOT_CREDITED
    return None


def discount_cents(*, kind: str, value: int, threshold_cents: int, amount_cents: int) -> int:
    """The discount one coupon gives on an order of ``amount_cents``.

    discount_rate: ``value`` basis points of the amount (1500 = 15% off);
    amount_off: ``value`` once the amount reaches the threshold; gift: its
    face value. Never more than the order amount.
    """
    if kind == "discount_rate":
        off = amount_cents * value // 10_000
    elif kind == "amount_off":
        if amount_cents < threshold_cents:
            raise TransitionRefused(LifecycleRefusal.BELOW_THRESHOLD)
        off = value
    elif kind == "gift":
        off = value
    else:
        raise ValueError(f"unknown coupon kind {kind!r}")
    return max(0, min(off, amount_cents))


class OrderStep(enum.StrEnum):
    APPLY = "apply"
    DUPLICATE = "duplicate"


ORDER_MOVES: dict[tuple[str, str], OrderStep | LifecycleRefusal] = {
    ("placed", "paid"): OrderStep.APPLY,
    ("placed", "fulfilled"): LifecycleRefusal.NOT_PAID,
    ("placed", "cancelled"): OrderStep.APPLY,
    ("placed", "refunded"): LifecycleRefusal.NOT_PAID,
    ("paid", "paid"): OrderStep.DUPLICATE,
    ("paid", "fulfilled"): OrderStep.APPLY,
    ("paid", "cancelled"): LifecycleRefusal.PAID_ORDER_NOT_CANCELLABLE,
    ("paid", "refunded"): OrderStep.APPLY,
    # A payment delivered after the shipment it preceded changes nothing.
    ("fulfilled", "paid"): OrderStep.DUPLICATE,
    ("fulfilled", "fulfilled"): OrderStep.DUPLICATE,
    ("fulfilled", "cancelled"): LifecycleRefusal.PAID_ORDER_NOT_CANCELLABLE,
    ("fulfilled", "refunded"): OrderStep.APPLY,
    ("cancelled", "cancelled"): OrderStep.DUPLICATE,
    ("cancelled", "paid"): LifecycleRefusal.ORDER_CLOSED,
    ("cancelled", "fulfilled"): LifecycleRefusal.ORDER_CLOSED,
    ("cancelled", "refunded"): LifecycleRefusal.ORDER_CLOSED,
    ("refunded", "refunded"): OrderStep.DUPLICATE,
    ("refunded", "paid"): LifecycleRefusal.ORDER_CLOSED,
    ("refunded", "fulfilled"): LifecycleRefusal.ORDER_CLOSED,
    ("refunded", "cancelled"): LifecycleRefusal.ORDER_CLOSED,
}


def order_step(current: str, new: str) -> OrderStep:
    """Apply, or ignore as a duplicate, an order moving from ``current`` to
    ``new``; raise TransitionRefused when the move is illegal."""
    step = ORDER_MOVES.get((current, new))
    if step is None:
        raise ValueError(f"unknown order states {current!r} -> {new!r}")
    if isinstance(step, LifecycleRefusal):
        raise TransitionRefused(step)
    return step


def returned_status(expires_at: datetime | None, at: datetime) -> str:
    """The state of a coupon given back by an order cancelled before payment:
    unused again, unless it expired meanwhile."""
    return "expired" if expires_at is not None and expires_at <= at else "unused"


def cancel_refusal(status: str) -> LifecycleRefusal | None:
    """May an operator cancel a coupon in ``status``? (Cancelling a cancelled
    coupon again is a no-op, not a refusal.)"""
    if status == "used":
        return LifecycleRefusal.ALREADY_USED
    if status == "expired":
        return LifecycleRefusal.EXPIRED
    if status == "voided":
        return LifecycleRefusal.VOIDED
    if status == "written_off":
        return LifecycleRefusal.WRITTEN_OFF
    return None


def is_self_referral(
    *, referrer_id: int, referee_id: int, referrer_digest: bytes | None, referee_digest: bytes | None
) -> bool:
    """Same member, or the same mobile number behind two member IDs."""
    if referrer_id == referee_id:
        return True
    return referrer_digest is not None and referrer_digest == referee_digest


def rebates_due(successful_referrals: int, every: int) -> int:
    """How many rebates ``successful_referrals`` earn: one per ``every``."""
    if every < 1:
        raise ValueError("the rebate threshold must be at least 1")
    return successful_referrals // every
