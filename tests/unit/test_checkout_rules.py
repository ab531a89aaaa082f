"""The checkout rules: which coupons apply to a cart, why not, what each
saves, best first; with properties checked over generated wallets and carts."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from issuance.shared.domain.checkout import (
    Cart,
    WalletCoupon,
    best,
    checkout_refusal,
    choose,
    evaluate,
    options_for,
    rank_key,
)
from issuance.shared.domain.coupons import CouponView, LifecycleRefusal, use_refusal

NOW = datetime(2026, 11, 30, 12, tzinfo=UTC)
MEMBER = 7


def coupon(**overrides: object) -> WalletCoupon:
    values: dict[str, object] = {
        "code": "AAA0000001",
        "member_id": MEMBER,
        "kind": "amount_off",
        "value": 500,
        "threshold_cents": 5000,
        "valid_from": NOW - timedelta(days=1),
        "expires_at": NOW + timedelta(days=3),
        "status": "unused",
    }
    values.update(overrides)
    return WalletCoupon(**values)  # type: ignore[arg-type]


def cart(amount: int = 10_000, items: int = 2, at: datetime = NOW) -> Cart:
    return Cart(amount_cents=amount, items=items, at=at)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"valid_from": NOW + timedelta(days=15)}, LifecycleRefusal.NOT_YET_VALID),
        ({"expires_at": NOW}, LifecycleRefusal.EXPIRED),
        ({"status": "expired"}, LifecycleRefusal.EXPIRED),
        ({"status": "used", "held_by": "SO-1"}, LifecycleRefusal.ALREADY_USED),
        ({"status": "cancelled"}, LifecycleRefusal.CANCELLED),
        ({"held_by": "SO-1"}, LifecycleRefusal.HELD_BY_ANOTHER_ORDER),
        ({"threshold_cents": 10_001}, LifecycleRefusal.BELOW_THRESHOLD),
        ({"member_id": 8}, LifecycleRefusal.NOT_OWNER),
        ({"status": "available", "member_id": None}, LifecycleRefusal.NOT_ISSUED),
        ({"credited": False}, LifecycleRefusal.NOT_CREDITED),
    ],
)
def test_an_inapplicable_coupon_says_why_and_saves_nothing(overrides, reason):
    option = evaluate(coupon(**overrides), cart(), member_id=MEMBER, order_id="SO-2")
    assert (option.applicable, option.reason, option.discount_cents) == (False, reason, 0)
    assert option.reason_text == reason.text and option.reason_text


def test_the_validity_window_holds_at_both_ends():
    window = {"valid_from": NOW, "expires_at": NOW + timedelta(days=1)}
    assert checkout_refusal(coupon(**window), cart(at=NOW - timedelta(seconds=1)), member_id=MEMBER) is (
        LifecycleRefusal.NOT_YET_VALID
    )
    assert checkout_refusal(coupon(**window), cart(at=NOW), member_id=MEMBER) is None
    last = NOW + timedelta(days=1)
    assert checkout_refusal(coupon(**window), cart(at=last), member_id=MEMBER) is LifecycleRefusal.EXPIRED


def test_the_asynchronous_rule_enforces_valid_from_too():
    view = CouponView(
        code="AAA0000001",
        status="unused",
        member_id=MEMBER,
        order_id=None,
        expires_at=NOW + timedelta(days=30),
        credited=True,
        kind="gift",
        value=100,
        threshold_cents=0,
        valid_from=NOW + timedelta(days=15),
    )
    assert use_refusal(view, member_id=MEMBER, order_id="SO-1", at=NOW) is LifecycleRefusal.NOT_YET_VALID
    later = NOW + timedelta(days=15)
    assert use_refusal(view, member_id=MEMBER, order_id="SO-1", at=later) is None


def test_a_coupon_held_or_used_by_this_very_order_still_applies():
    held = coupon(held_by="SO-1")
    used = coupon(status="used", held_by="SO-1")
    for c in (held, used):
        assert evaluate(c, cart(), member_id=MEMBER, order_id="SO-1").discount_cents == 500


@pytest.mark.parametrize(
    ("kind", "value", "threshold", "amount", "saving"),
    [
        ("discount_rate", 1500, 0, 20_000, 3000),  # 15% off
        ("amount_off", 500, 5000, 5000, 500),  # at the threshold exactly
        ("gift", 800, 0, 10_000, 800),
        ("gift", 800, 0, 300, 300),  # never more than the cart
        ("amount_off", 9000, 0, 4000, 4000),
    ],
)
def test_each_kind_saves_what_its_rule_says(kind, value, threshold, amount, saving):
    c = coupon(kind=kind, value=value, threshold_cents=threshold)
    assert evaluate(c, cart(amount), member_id=MEMBER).discount_cents == saving


def test_best_first_then_soonest_to_expire_then_code_and_inapplicable_last():
    soon, late = NOW + timedelta(days=1), NOW + timedelta(days=9)
    wallet = [
        coupon(code="E-expired", status="expired", value=9000),
        coupon(code="D-small", value=100, expires_at=soon),
        coupon(code="C-late", value=500, expires_at=late),
        coupon(code="B-soon", value=500, expires_at=soon),
        coupon(code="A-soon", value=500, expires_at=soon),
        coupon(code="F-rate", kind="discount_rate", value=1000, threshold_cents=0, expires_at=None),
    ]
    ranked = options_for(wallet, cart(10_000), member_id=MEMBER)
    assert [o.coupon.code for o in ranked] == ["F-rate", "A-soon", "B-soon", "C-late", "D-small", "E-expired"]
    chosen = best(ranked)
    assert chosen is not None and chosen.coupon.code == "F-rate"
    assert best(options_for([wallet[0]], cart(), member_id=MEMBER)) is None


def test_a_chosen_set_never_saves_more_than_the_cart_and_names_each_refusal():
    wallet = [coupon(code="A", kind="gift", value=700), coupon(code="B", kind="gift", value=600)]
    chosen = choose(["B", "A", "A"], wallet, cart(1000), member_id=MEMBER)
    assert chosen.lines == (("A", 700), ("B", 300)) and chosen.discount_cents == 1000 and chosen.accepted
    refused = choose(["A", "ZZZ"], wallet, cart(1000), member_id=8)
    assert refused.refused == (("A", LifecycleRefusal.NOT_OWNER), ("ZZZ", LifecycleRefusal.UNKNOWN_CODE))
    assert not refused.accepted


@pytest.mark.parametrize(
    "bad", [{"amount_cents": -1}, {"items": 2.5}, {"amount_cents": True}, {"items": "3"}]
)
def test_a_cart_refuses_bad_numbers(bad):
    values: dict[str, object] = {"amount_cents": 100, "items": 1, "at": NOW}
    values.update(bad)
    with pytest.raises(ValueError):
        Cart(**values)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="time zone"):
        Cart(amount_cents=1, items=1, at=datetime(2026, 1, 1))


def test_an_unknown_kind_is_an_error_not_a_refusal():
    with pytest.raises(ValueError, match="unknown coupon kind"):
        evaluate(coupon(kind="mystery"), cart(), member_id=MEMBER)


# --- properties -----------------------------------------------------------------

instants = st.datetimes(
    min_value=datetime(2026, 1, 1), max_value=datetime(2027, 12, 31), timezones=st.just(UTC)
)
coupons = st.builds(
    WalletCoupon,
    code=st.text(alphabet="ABCDEFGH23456789", min_size=3, max_size=6),
    member_id=st.sampled_from([MEMBER, MEMBER, MEMBER, 8, None]),
    kind=st.sampled_from(sorted(("discount_rate", "amount_off", "gift"))),
    value=st.integers(min_value=0, max_value=50_000),
    threshold_cents=st.integers(min_value=0, max_value=50_000),
    valid_from=st.none() | instants,
    expires_at=st.none() | instants,
    status=st.sampled_from(["unused", "unused", "used", "expired", "cancelled", "available"]),
    credited=st.booleans(),
    held_by=st.none() | st.sampled_from(["SO-1", "SO-2"]),
)
carts = st.builds(
    Cart, amount_cents=st.integers(min_value=0, max_value=100_000), items=st.integers(0, 50), at=instants
)


@given(st.lists(coupons, max_size=12), carts, st.sampled_from([None, "SO-1"]))
def test_properties_of_every_wallet_and_cart(wallet, c, order_id):
    ranked = options_for(wallet, c, member_id=MEMBER, order_id=order_id)
    assert len(ranked) == len(wallet)
    for option in ranked:
        # The discount never exceeds the cart, and never goes negative.
        assert 0 <= option.discount_cents <= c.amount_cents
        # An inapplicable coupon always has a reason; an applicable one none.
        assert option.applicable == (option.reason is None)
        if not option.applicable:
            assert option.discount_cents == 0 and option.reason_text
    keys = [rank_key(o) for o in ranked]
    assert keys == sorted(keys)
    # Total and stable: any shuffle of the wallet ranks the same way.
    shuffled = list(wallet)
    random.Random(len(wallet)).shuffle(shuffled)
    again = options_for(shuffled, c, member_id=MEMBER, order_id=order_id)
    assert [rank_key(o) for o in again] == keys
    first = best(ranked)
    if first is not None:
        assert all(first.discount_cents >= o.discount_cents for o in ranked)


@given(st.lists(coupons, max_size=8), carts)
def test_a_chosen_set_never_exceeds_the_cart(wallet, c):
    chosen = choose([w.code for w in wallet], wallet, c, member_id=MEMBER)
    assert 0 <= chosen.discount_cents <= c.amount_cents
    assert all(reason is not None for _, reason in chosen.refused)


def test_a_coupon_used_by_this_order_asked_again_with_a_cart_below_its_threshold():
    """Found by the property test: the idempotent re-answer for a coupon this
    order already used computed its discount against a cart below the
    threshold, which raised instead of answering with the reason."""
    used = coupon(kind="amount_off", value=500, threshold_cents=5_000, status="used", held_by="SO-1")
    option = evaluate(used, cart(amount=1_000), member_id=MEMBER, order_id="SO-1")
    assert option.reason is LifecycleRefusal.BELOW_THRESHOLD and option.discount_cents == 0
    again = evaluate(used, cart(amount=6_000), member_id=MEMBER, order_id="SO-1")
    assert again.applicable and again.discount_cents == 500
