"""What a cancellation or a refund does to an order's coupons and to the
referrals and rebates built on it, as plain functions (like the rest of
issuance.shared.domain, this module imports no database, broker or network
code).

The seeds' rules for coupons: an order cancelled before payment, or
refunded by the merchant before fulfilment, gives its coupons back (unused,
or expired when their time is up); any other refund after payment voids
them: ``voided`` is final, the coupon is neither usable nor returned. A
returned coupon comes back as
:func:`issuance.shared.domain.coupons.returned_status` says (refund_store
applies it to the order's coupons in one statement).

Referral fraud rules (refer three, get one back): a referral counts only
for a referee's paid, unrefunded order of at least the minimum amount; the
referrer's own order (the one its share was made from) must be paid and not
cancelled or refunded for its referrals to earn rebates; a referee's refund
reverses the referral, and a rebate no longer earned is taken back:
an unused rebate coupon is voided (clawed back), an amount or a coupon
already spent is flagged for an operator's review.
"""

from __future__ import annotations

import enum

# Orders whose payment stands: their coupons are spent, their referrals count.
PAID_STATES = frozenset(("paid", "fulfilled"))
REFUNDERS = ("buyer", "merchant")
# Why a checkout reservation ended with its order (kept as its release reason).
RELEASED_CANCELLED = "order_cancelled"
RELEASED_REFUNDED = "order_refunded"


class CouponFate(enum.StrEnum):
    """What happens to the coupons an order used when the order ends early."""

    RETURN = "return"  # back to the wallet (unused, or expired if due)
    VOID = "void"  # final: neither usable nor returned


def coupon_fate(*, order_status: str, new_status: str, refunded_by: str | None = None) -> CouponFate | None:
    """The fate of an order's coupons when it moves from ``order_status`` to
    ``new_status`` (None: the move does not touch them). ``refunded_by`` is
    who refunded it, "buyer" (the default) or "merchant"."""
    if refunded_by is not None and refunded_by not in REFUNDERS:
        raise ValueError(f"refunded_by must be one of {REFUNDERS}, not {refunded_by!r}")
    if new_status == "cancelled" and order_status == "placed":
        return CouponFate.RETURN
    if new_status != "refunded" or order_status not in PAID_STATES:
        return None
    if order_status == "paid" and refunded_by == "merchant":
        return CouponFate.RETURN
    return CouponFate.VOID


class ReferralRefusal(enum.StrEnum):
    """Why a referee's paid order does not count as a referral (stored)."""

    BELOW_MINIMUM = "referral_below_minimum"
    NOT_PAID = "referral_order_not_paid"


def referral_refusal(
    *, order_status: str, amount_cents: int, min_amount_cents: int
) -> ReferralRefusal | None:
    """May a referee's order count as a referral? It must be paid and not
    refunded, and reach the minimum amount (1-cent orders farm rebates)."""
    if order_status not in PAID_STATES:
        return ReferralRefusal.NOT_PAID
    if amount_cents < min_amount_cents:
        return ReferralRefusal.BELOW_MINIMUM
    return None


class RebateReversal(enum.StrEnum):
    """How a rebate no longer earned was taken back (stored, reported)."""

    CLAWED_BACK = "clawed_back"  # its unused coupon was voided
    REVIEW = "review"  # spent already (an amount, a used coupon): an operator decides


def rebate_reversal(*, amount_cents: int | None, code_status: str | None) -> RebateReversal:
    """Take back a rebate: an unused (or not yet bound) rebate coupon is
    voided; an amount credited by the rebate row, or a coupon already used
    or expired, cannot be taken back by the pipeline and goes to review."""
    if amount_cents is None and code_status in (None, "unused"):
        return RebateReversal.CLAWED_BACK
    return RebateReversal.REVIEW


def rebate_changes(*, earned: int, standing: int) -> tuple[int, int]:
    """(to write, to reverse): ``earned`` rebates are due, ``standing`` are
    written and not reversed. The newest are reversed first."""
    if earned < 0 or standing < 0:
        raise ValueError("rebate counts are never negative")
    return max(0, earned - standing), max(0, standing - earned)
