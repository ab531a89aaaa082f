"""The refund rules as pure functions: what a cancellation or a refund does
to an order's coupons, which referee orders count, and how a rebate no
longer earned is taken back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from issuance.shared.domain.coupons import ORDER_MOVES, OrderStep, returned_status
from issuance.shared.domain.refunds import (
    CouponFate,
    RebateReversal,
    ReferralRefusal,
    coupon_fate,
    rebate_changes,
    rebate_reversal,
    referral_refusal,
)

AT = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("order_status", "new_status", "refunded_by", "fate"),
    [
        ("placed", "cancelled", None, CouponFate.RETURN),  # unpaid cancellation
        ("paid", "refunded", "merchant", CouponFate.RETURN),  # merchant, before fulfilment
        ("paid", "refunded", "buyer", CouponFate.VOID),  # the buyer, after payment
        ("paid", "refunded", None, CouponFate.VOID),  # unnamed: the buyer
        ("fulfilled", "refunded", "merchant", CouponFate.VOID),  # after fulfilment
        ("fulfilled", "refunded", "buyer", CouponFate.VOID),
        ("placed", "paid", None, None),
        ("paid", "fulfilled", None, None),
    ],
)
def test_the_seeds_say_which_refunds_return_coupons(order_status, new_status, refunded_by, fate):
    assert coupon_fate(order_status=order_status, new_status=new_status, refunded_by=refunded_by) is fate


def test_an_unknown_refunder_is_an_error():
    with pytest.raises(ValueError, match="refunded_by"):
        coupon_fate(order_status="paid", new_status="refunded", refunded_by="bank")


@given(st.sampled_from(sorted(ORDER_MOVES)), st.sampled_from((None, "buyer", "merchant")))
def test_only_legal_moves_that_end_an_order_touch_its_coupons(move, refunded_by):
    current, new = move
    fate = coupon_fate(order_status=current, new_status=new, refunded_by=refunded_by)
    if fate is not None:
        assert ORDER_MOVES[move] is OrderStep.APPLY
        assert new in ("cancelled", "refunded")


def test_a_returned_coupon_comes_back_expired_when_its_time_is_up():
    assert returned_status(AT + timedelta(seconds=1), AT) == "unused"
    assert returned_status(AT, AT) == "expired"
    assert returned_status(None, AT) == "unused"


@pytest.mark.parametrize(
    ("status", "amount", "least", "refusal"),
    [
        ("paid", 1_000, 1_000, None),
        ("fulfilled", 5_000, 1_000, None),
        ("paid", 1, 1_000, ReferralRefusal.BELOW_MINIMUM),
        ("refunded", 5_000, 1_000, ReferralRefusal.NOT_PAID),
        ("cancelled", 5_000, 0, ReferralRefusal.NOT_PAID),
        ("placed", 5_000, 0, ReferralRefusal.NOT_PAID),
    ],
)
def test_a_referral_needs_a_paid_unrefunded_order_of_the_minimum(status, amount, least, refusal):
    assert referral_refusal(order_status=status, amount_cents=amount, min_amount_cents=least) is refusal


@pytest.mark.parametrize(
    ("amount", "code_status", "reversal"),
    [
        (None, "unused", RebateReversal.CLAWED_BACK),
        (None, None, RebateReversal.CLAWED_BACK),  # owed, never bound: nothing to take
        (None, "used", RebateReversal.REVIEW),
        (None, "expired", RebateReversal.REVIEW),
        (500, None, RebateReversal.REVIEW),
    ],
)
def test_a_rebate_is_clawed_back_when_unspent_and_reviewed_otherwise(amount, code_status, reversal):
    assert rebate_reversal(amount_cents=amount, code_status=code_status) is reversal


@given(st.integers(0, 50), st.integers(0, 50))
def test_settling_rebates_reaches_exactly_what_is_earned(earned, standing):
    write, reverse = rebate_changes(earned=earned, standing=standing)
    assert write >= 0 and reverse >= 0 and not (write and reverse)
    assert standing + write - reverse == earned


def test_rebate_counts_are_never_negative():
    with pytest.raises(ValueError, match="negative"):
        rebate_changes(earned=-1, standing=0)


def test_refunded_by_goes_with_a_refund_only():
    from issuance.shared.errors import InvalidMessage
    from issuance.shared.wire.messages import OrderStatusChanged

    payload = {"v": 1, "order_id": "SO-1", "status": "refunded", "changed_at": AT.isoformat()}
    assert OrderStatusChanged.from_payload({**payload, "refunded_by": "merchant"}).refunded_by == "merchant"
    assert OrderStatusChanged.from_payload(payload).refunded_by is None
    with pytest.raises(InvalidMessage, match="refunded_by only with status refunded"):
        OrderStatusChanged.from_payload({**payload, "status": "paid", "refunded_by": "merchant"})
    with pytest.raises(InvalidMessage):
        OrderStatusChanged.from_payload({**payload, "refunded_by": "bank"})


def test_the_referral_minimum_is_a_non_negative_setting():
    from issuance.shared.settings import SettingsError, settings_from

    assert settings_from({}).referral_min_order_cents == 1_000
    assert settings_from({"ISSUANCE_REFERRAL_MIN_ORDER_CENTS": "0"}).referral_min_order_cents == 0
    with pytest.raises(SettingsError, match="REFERRAL_MIN_ORDER_CENTS must be 0 or more"):
        settings_from({"ISSUANCE_REFERRAL_MIN_ORDER_CENTS": "-1"})
    with pytest.raises(SettingsError, match="must be an integer"):
        settings_from({"ISSUANCE_REFERRAL_MIN_ORDER_CENTS": "2.5"})
