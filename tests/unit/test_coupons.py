"""The pure rules of issuance.shared.domain.coupons and the back-office messages."""

from __future__ import annotations

import ast
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jsonschema
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from issuance.shared.domain import coupons
from issuance.shared.domain.coupons import CouponView, LifecycleRefusal, OrderStep, TransitionRefused
from issuance.shared.errors import InvalidMessage
from issuance.shared.wire.codec import ROUTES, encode
from issuance.shared.wire.messages import MemberRegistered, OrderStatusChanged

NOW = datetime(2026, 11, 11, 12, tzinfo=UTC)


def coupon(**overrides) -> CouponView:
    values = {
        "code": "AB23456789ABCDE",
        "status": "unused",
        "member_id": 7,
        "order_id": None,
        "expires_at": NOW + timedelta(days=1),
        "credited": True,
        "kind": "amount_off",
        "value": 500,
        "threshold_cents": 5000,
    }
    return CouponView(**{**values, **overrides})


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({}, None),
        ({"status": "used", "order_id": "SO-1"}, None),  # the same order again: idempotent
        ({"status": "used", "order_id": "SO-2"}, LifecycleRefusal.ALREADY_USED),
        ({"status": "available", "member_id": None}, LifecycleRefusal.NOT_ISSUED),
        ({"member_id": 8}, LifecycleRefusal.NOT_OWNER),
        ({"status": "cancelled"}, LifecycleRefusal.CANCELLED),
        ({"status": "expired"}, LifecycleRefusal.EXPIRED),
        ({"expires_at": NOW}, LifecycleRefusal.EXPIRED),  # past 24:00, not swept yet
        ({"credited": False}, LifecycleRefusal.NOT_CREDITED),
    ],
)
def test_who_may_use_a_coupon(overrides, reason):
    assert coupons.use_refusal(coupon(**overrides), member_id=7, order_id="SO-1", at=NOW) is reason


def test_discounts_by_kind_never_exceed_the_order():
    assert (
        coupons.discount_cents(kind="discount_rate", value=1500, threshold_cents=0, amount_cents=20_000)
        == 3000
    )
    assert (
        coupons.discount_cents(kind="amount_off", value=500, threshold_cents=5000, amount_cents=5000) == 500
    )
    assert coupons.discount_cents(kind="gift", value=9999, threshold_cents=0, amount_cents=100) == 100
    with pytest.raises(TransitionRefused) as refused:
        coupons.discount_cents(kind="amount_off", value=500, threshold_cents=5000, amount_cents=4999)
    assert refused.value.reason is LifecycleRefusal.BELOW_THRESHOLD


@given(
    st.sampled_from(["discount_rate", "amount_off", "gift"]),
    st.integers(1, 10_000),
    st.integers(0, 10**9),
)
def test_a_discount_is_between_zero_and_the_amount(kind, value, amount):
    try:
        off = coupons.discount_cents(kind=kind, value=value, threshold_cents=0, amount_cents=amount)
    except TransitionRefused:
        pytest.fail("no threshold, no refusal")
    assert 0 <= off <= amount


def test_order_moves():
    assert coupons.order_step("placed", "paid") is OrderStep.APPLY
    assert coupons.order_step("placed", "cancelled") is OrderStep.APPLY
    assert coupons.order_step("paid", "refunded") is OrderStep.APPLY
    for state in ("paid", "cancelled", "refunded"):
        assert coupons.order_step(state, state) is OrderStep.DUPLICATE
    for current, new, reason in [
        ("paid", "cancelled", LifecycleRefusal.PAID_ORDER_NOT_CANCELLABLE),
        ("placed", "refunded", LifecycleRefusal.NOT_PAID),
        ("cancelled", "paid", LifecycleRefusal.ORDER_CLOSED),
        ("refunded", "paid", LifecycleRefusal.ORDER_CLOSED),
    ]:
        with pytest.raises(TransitionRefused) as refused:
            coupons.order_step(current, new)
        assert refused.value.reason is reason


def test_returned_coupons_and_operator_cancels():
    assert coupons.returned_status(NOW + timedelta(seconds=1), NOW) == "unused"
    assert coupons.returned_status(NOW, NOW) == "expired"
    assert coupons.cancel_refusal("unused") is None and coupons.cancel_refusal("available") is None
    assert coupons.cancel_refusal("used") is LifecycleRefusal.ALREADY_USED
    assert coupons.cancel_refusal("expired") is LifecycleRefusal.EXPIRED


def test_self_referral_is_the_same_member_or_the_same_number():
    assert coupons.is_self_referral(referrer_id=1, referee_id=1, referrer_digest=None, referee_digest=b"x")
    assert coupons.is_self_referral(referrer_id=1, referee_id=2, referrer_digest=b"x", referee_digest=b"x")
    assert not coupons.is_self_referral(
        referrer_id=1, referee_id=2, referrer_digest=None, referee_digest=None
    )
    assert not coupons.is_self_referral(
        referrer_id=1, referee_id=2, referrer_digest=b"x", referee_digest=b"y"
    )


@given(st.integers(0, 10_000), st.integers(1, 50))
def test_one_rebate_per_k_referrals(referrals, every):
    due = coupons.rebates_due(referrals, every)
    assert due * every <= referrals < (due + 1) * every


def test_the_rules_import_no_database_broker_or_network_code():
    tree = ast.parse(Path(coupons.__file__).read_text())
    imported = {
        (node.module or "") if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    forbidden = (
        "sqlalchemy",
        "psycopg",
        "pika",
        "redis",
        "dramatiq",
        "prometheus_client",
        "issuance.shared.db.store",
    )
    assert not [m for m in imported if m.startswith(forbidden)]


def test_the_new_messages_validate_and_match_their_schemas():
    for message_type in (OrderStatusChanged, MemberRegistered):
        example = dict(message_type.EXAMPLE)
        jsonschema.validate(example, message_type.json_schema())
        message = message_type.from_payload(example)
        assert message_type.from_payload(orjson.loads(orjson.dumps(message.to_payload()))) == message
        assert ROUTES[message_type.TYPE].queue in ("orders", "members")
        assert encode(message)
    with pytest.raises(InvalidMessage):
        OrderStatusChanged.from_payload({**OrderStatusChanged.EXAMPLE, "status": "shipped"})
    with pytest.raises(InvalidMessage):
        MemberRegistered.from_payload(
            {"v": 1, "member_id": 1, "phone": "+8613800138000", "registered_at": "x"}
        )
    both = {"v": 1, "member_id": 1, "phone": "+8613800138000", "registered_at": "2026-11-12T09:30:00+08:00"}
    with pytest.raises(InvalidMessage, match="exactly one"):
        MemberRegistered.from_payload(both)
    paid = OrderStatusChanged.from_payload(dict(OrderStatusChanged.EXAMPLE))
    assert (
        paid.business_key()
        != OrderStatusChanged(
            order_id=paid.order_id, status="refunded", changed_at=paid.changed_at
        ).business_key()
    )
