"""The pure rules of redemptions without an order and of shared promo codes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from issuance.shared.domain.checkout import Cart, CouponRules, WalletCoupon, choose, evaluate
from issuance.shared.domain.coupons import LifecycleRefusal, cancel_refusal, holder_refusal, writeoff_refusal

NOW = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("status", "kind", "expires", "held", "expected"),
    [
        ("available", "amount_off", None, False, None),  # a partner's or printed code
        ("unused", "gift", NOW + timedelta(days=1), False, None),
        ("unused", "discount_rate", None, False, LifecycleRefusal.NEEDS_AN_ORDER),
        ("unused", "gift", NOW, False, LifecycleRefusal.EXPIRED),
        ("unused", "gift", None, True, LifecycleRefusal.HELD_BY_ANOTHER_ORDER),
        ("used", "gift", None, False, LifecycleRefusal.ALREADY_USED),
        ("voided", "gift", None, False, LifecycleRefusal.VOIDED),
        ("expired", "gift", None, False, LifecycleRefusal.EXPIRED),
        ("cancelled", "available", None, False, LifecycleRefusal.CANCELLED),
        ("written_off", "gift", None, False, LifecycleRefusal.WRITTEN_OFF),
    ],
)
def test_what_may_be_written_off(status, kind, expires, held, expected):
    assert writeoff_refusal(status=status, kind=kind, expires_at=expires, held=held, at=NOW) is expected


def test_a_written_off_code_is_refused_at_checkout_with_its_reason():
    assert holder_refusal(status="written_off", owner=None, member_id=1) is LifecycleRefusal.WRITTEN_OFF
    assert holder_refusal(status="written_off", owner=1, member_id=1) is LifecycleRefusal.WRITTEN_OFF
    # Nor may an operator cancel it: the write-off and its audit record stand.
    assert cancel_refusal("written_off") is LifecycleRefusal.WRITTEN_OFF


def promo(**fields) -> WalletCoupon:
    values = {
        "code": "SPRING50",
        "member_id": 7,
        "kind": "amount_off",
        "value": 500,
        "threshold_cents": 5000,
        "valid_from": None,
        "expires_at": NOW + timedelta(days=1),
        "status": "unused",
        "promo": True,
        "template_id": -1,
        **fields,
    }
    return WalletCoupon(**values)


def test_a_promo_code_follows_the_coupon_rules_and_its_cap():
    cart = Cart(amount_cents=6000, items=1, at=NOW)
    assert evaluate(promo(), cart, member_id=7).discount_cents == 500
    assert evaluate(promo(), Cart(amount_cents=4000, items=1, at=NOW), member_id=7).reason is (
        LifecycleRefusal.BELOW_THRESHOLD
    )
    assert evaluate(promo(expires_at=NOW), cart, member_id=7).reason is LifecycleRefusal.EXPIRED
    assert evaluate(promo(exhausted=True), cart, member_id=7).reason is LifecycleRefusal.PROMO_EXHAUSTED
    # The order that holds a use keeps it, even when the cap is reached since.
    mine = promo(exhausted=True, held_by="SO-1")
    assert evaluate(mine, cart, member_id=7, order_id="SO-1").reason is None
    limited = promo(rules=CouponRules(per_person_limit=1), member_uses=1)
    assert evaluate(limited, cart, member_id=7).reason is LifecycleRefusal.PER_PERSON_LIMIT
    stores = promo(rules=CouponRules(stores=frozenset({"S1"})))
    assert evaluate(stores, cart, member_id=7).reason is LifecycleRefusal.WRONG_STORE
    assert choose(["SPRING50"], [promo()], cart, member_id=7).discount_cents == 500
