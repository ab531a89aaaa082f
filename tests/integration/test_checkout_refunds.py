"""Refunds at checkout against real PostgreSQL: the synchronous API's
refund and the asynchronous order-status-changed path apply one rule (a
merchant's refund before fulfilment returns the coupons, any other voids
them), agree whichever comes first, and a returned code can be reserved
again."""

from __future__ import annotations

import pytest
from issuance.producers.checkout import service
from issuance.shared.domain.checkout import Cart
from issuance.shared.domain.coupons import LifecycleRefusal
from issuance.shared.wire.messages import utcnow

from tests.conftest import verify_clean
from tests.integration.lifecycle_support import member_with_package, move, one
from tests.integration.test_checkout import cart_body, client, conforms, order_id, three_kinds

__all__ = ["client"]  # the fixture, shared with the checkout tests


def paid_order(settings, pool) -> tuple[int, str, str]:
    """A member's order that reserved and redeemed one coupon: (member, order, code)."""
    rate, _, _, act = three_kinds(settings)
    member, codes, _ = member_with_package(pool, settings, act["slug"])
    code = next(c for c in codes if c.startswith(rate))
    order = order_id()
    cart = Cart(amount_cents=20_000, items=1, at=utcnow())
    assert service.reserve(pool, order, member_id=member, cart=cart, codes=[code]).outcome == "reserved"
    assert service.redeem(pool, order, at=utcnow()).outcome == "redeemed"
    return member, order, code


def test_a_merchant_refund_before_fulfilment_returns_the_code_for_the_next_order(settings, pool, client):
    member, order, code = paid_order(settings, pool)
    refunded = client.post(f"/api/orders/{order}/refund", json={"refunded_by": "merchant"})
    assert (refunded.status_code, conforms(refunded.json(), "CheckoutAnswer")["outcome"]) == (200, "returned")
    assert (
        client.post(f"/api/orders/{order}/refund", json={"refunded_by": "merchant"}).json() == refunded.json()
    )
    assert one(settings, "SELECT status, order_id FROM codes WHERE code = %s", code) == ("unused", None)
    assert one(
        settings, "SELECT state, release_reason FROM checkout_reservations WHERE order_id = %s", order
    ) == (
        "released",
        "order_refunded",
    )
    # The code is free again: a new order reserves and redeems it.
    again = client.post(f"/api/orders/{order_id()}/reserve", json=cart_body(member, [code]))
    assert (again.status_code, again.json()["outcome"]) == (200, "reserved")
    # The old order cannot be redeemed again.
    assert client.post(f"/api/orders/{order}/redeem").json()["reason"] == "order_closed"
    verify_clean(settings)


@pytest.mark.parametrize(
    "body", [{}, {"refunded_by": "buyer"}, {"refunded_by": "merchant", "fulfilled": True}]
)
def test_any_other_refund_voids_the_code_for_good(settings, pool, client, body):
    member, order, code = paid_order(settings, pool)
    voided = client.post(f"/api/orders/{order}/refund", json=body)
    assert (voided.status_code, conforms(voided.json(), "CheckoutAnswer")["outcome"]) == (200, "voided")
    # Asked again, even as the merchant: the same answer, nothing comes back.
    assert (
        client.post(f"/api/orders/{order}/refund", json={"refunded_by": "merchant"}).json() == voided.json()
    )
    assert one(settings, "SELECT status, order_id FROM codes WHERE code = %s", code) == ("voided", order)
    listed = client.get(f"/api/members/{member}/coupons", params={"amount_cents": 20_000, "items": 1}).json()
    conforms(listed, "CouponList")  # a voided coupon is part of the described answer
    assert {c["code"]: c["reason"] for c in listed["coupons"]}[code] == "voided"
    again = client.post(f"/api/orders/{order_id()}/reserve", json=cart_body(member, [code]))
    assert (again.status_code, again.json()["reason"]) == (409, "voided")
    verify_clean(settings)


def test_an_unpaid_order_is_released_not_refunded(settings, pool, client):
    rate, _, _, act = three_kinds(settings)
    member, codes, _ = member_with_package(pool, settings, act["slug"])
    code = next(c for c in codes if c.startswith(rate))
    order = order_id()
    client.post(f"/api/orders/{order}/reserve", json=cart_body(member, [code]))
    refused = client.post(f"/api/orders/{order}/refund", json={"refunded_by": "merchant"})
    assert (refused.status_code, refused.json()["reason"]) == (409, LifecycleRefusal.NOT_PAID.value)
    assert client.post(f"/api/orders/{order}/refund").json()["reason"] == "not_paid"
    assert client.post(f"/api/orders/{order}/refund", json={"refunded_by": "bank"}).status_code == 422
    assert client.post("/api/orders/unknown-order/refund").status_code == 404


def test_the_event_path_and_the_api_agree_whichever_refunds_first(settings, pool, client):
    _, first, code = paid_order(settings, pool)
    move(pool, first, "paid")
    # The event first (a merchant's refund before fulfilment), then the API.
    assert move(pool, first, "refunded", refunded_by="merchant").returned == 1
    assert client.post(f"/api/orders/{first}/refund").json()["outcome"] == "returned"
    assert one(settings, "SELECT status FROM codes WHERE code = %s", code) == "unused"
    # The API first (the buyer's refund voids), then the event as the merchant's.
    _, second, other = paid_order(settings, pool)
    move(pool, second, "paid")
    assert client.post(f"/api/orders/{second}/refund").json()["outcome"] == "voided"
    assert move(pool, second, "refunded", refunded_by="merchant").returned == 0
    assert one(settings, "SELECT status FROM codes WHERE code = %s", other) == "voided"
    verify_clean(settings)


def test_a_cancellation_event_releases_the_orders_reservation(settings, pool, client):
    rate, _, _, act = three_kinds(settings)
    member, codes, _ = member_with_package(pool, settings, act["slug"])
    code = next(c for c in codes if c.startswith(rate))
    order = order_id()
    assert client.post(f"/api/orders/{order}/reserve", json=cart_body(member, [code])).json()["outcome"] == (
        "reserved"
    )
    # The order system only publishes the cancellation: the hold ends with it.
    assert move(pool, order, "cancelled").outcome == "ok"
    assert one(
        settings, "SELECT state, release_reason FROM checkout_reservations WHERE order_id = %s", order
    ) == (
        "released",
        "order_cancelled",
    )
    assert client.post(f"/api/orders/{order}/release").json()["outcome"] == "released"
    again = client.post(f"/api/orders/{order_id()}/reserve", json=cart_body(member, [code]))
    assert (again.status_code, again.json()["outcome"]) == (200, "reserved")
    verify_clean(settings)
