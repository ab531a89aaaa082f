"""Coupons after issuance against real PostgreSQL: used in an order, given
back by a cancellation before payment, voided by a refund after payment,
expired by the sweep, cancelled by an operator; every transition idempotent, every illegal
one refused with its reason and recorded, and `verify` clean throughout."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import psycopg
import pytest
from issuance.shared.backoffice import catalog
from issuance.shared.domain.coupons import LifecycleRefusal
from issuance.shared.wire.messages import utcnow
from issuance.workers.lifecycle import OrderNotYetKnown, record_order

from tests.conftest import verify_clean
from tests.integration.lifecycle_support import (
    activity_with,
    member_with_package,
    move,
    one,
    place,
    prefix,
    refusals,
)


def test_redeemed_codes_become_used_with_order_and_discount_once(settings, pool):
    rate, off = prefix(), prefix()
    act = activity_with(
        settings,
        templates=[
            {"prefix": rate, "kind": "discount_rate", "value": 1500},
            {"prefix": off, "kind": "amount_off", "value": 500, "threshold_cents": 5000},
        ],
    )
    member, codes, _ = member_with_package(pool, settings, act["slug"])
    order = place(pool, member, amount=20_000, codes=tuple(codes))
    for code in codes:
        status, order_id, discount = one(
            settings, "SELECT status, order_id, discount_cents FROM codes WHERE code = %s", code
        )
        assert (status, order_id) == ("used", order.order_id)
        assert discount == (3000 if code.startswith(rate) else 500)
    assert one(settings, "SELECT discount_cents FROM orders WHERE order_id = %s", order.order_id) == 3500
    # The same event again changes nothing.
    assert not record_order(pool, order).recorded
    assert one(settings, "SELECT count(*) FROM codes WHERE status = 'used'") == 2
    verify_clean(settings)


def test_illegal_redemptions_are_refused_with_a_reason_and_recorded(settings, pool):
    act = activity_with(settings)
    owner, (code,), _ = member_with_package(pool, settings, act["slug"])
    other, (other_code,), _ = member_with_package(pool, settings, act["slug"])
    first = place(pool, other, codes=(code, "ZZZZZZZZZZZZ"))  # someone else's, and unknown
    low = place(pool, owner, amount=4_999, codes=(code,))  # below the 50.00 threshold
    used = place(pool, owner, amount=9_000, codes=(code,))
    again = place(pool, other, codes=(other_code,))
    place(pool, owner, codes=(code,))  # a second order with the same coupon
    assert set(refusals(settings)) == {
        (code, LifecycleRefusal.NOT_OWNER),
        ("ZZZZZZZZZZZZ", LifecycleRefusal.UNKNOWN_CODE),
        (code, LifecycleRefusal.BELOW_THRESHOLD),
        (code, LifecycleRefusal.ALREADY_USED),
    }
    assert one(settings, "SELECT order_id FROM codes WHERE code = %s", code) == used.order_id
    assert one(settings, "SELECT order_id FROM codes WHERE code = %s", other_code) == again.order_id
    for order in (first, low):
        assert one(settings, "SELECT discount_cents FROM orders WHERE order_id = %s", order.order_id) == 0
    verify_clean(settings)


def test_an_expired_or_cancelled_coupon_cannot_be_used(settings, pool):
    act = activity_with(settings, budget=5)
    member, (code,), _ = member_with_package(pool, settings, act["slug"])
    expires_at = one(settings, "SELECT expires_at FROM codes WHERE code = %s", code)
    # Not swept yet, but its time is up when the order is placed.
    late = place(pool, member, codes=(code,), at=expires_at + timedelta(seconds=1))
    assert one(settings, "SELECT status FROM codes WHERE code = %s", code) == "unused"
    assert (code, LifecycleRefusal.EXPIRED) in refusals(settings)
    assert one(settings, "SELECT discount_cents FROM orders WHERE order_id = %s", late.order_id) == 0

    member2, (code2,), _ = member_with_package(pool, settings, act["slug"])
    with psycopg.connect(settings.database_url) as conn:
        assert catalog.cancel_coupon(conn, code2, utcnow())
    place(pool, member2, codes=(code2,))
    assert (code2, LifecycleRefusal.CANCELLED) in refusals(settings)
    verify_clean(settings)


def test_cancel_before_payment_returns_coupons_refund_after_payment_voids_them(settings, pool):
    act = activity_with(settings, budget=5)
    member, (code,), _ = member_with_package(pool, settings, act["slug"])
    order = place(pool, member, codes=(code,))
    assert move(pool, order.order_id, "cancelled").outcome == "ok"
    assert one(settings, "SELECT status, order_id, discount_cents FROM codes WHERE code = %s", code) == (
        "unused",
        None,
        None,
    )
    assert move(pool, order.order_id, "cancelled").outcome == "duplicate"
    # A cancelled order cannot be paid afterwards.
    refused = move(pool, order.order_id, "paid")
    assert (refused.outcome, refused.reason) == ("refused", LifecycleRefusal.ORDER_CLOSED)

    # The returned coupon can be used again; paid then refunded by the buyer
    # voids it: it keeps its order, and can be neither used nor returned.
    paid = place(pool, member, codes=(code,))
    assert move(pool, paid.order_id, "paid").outcome == "ok"
    cancel = move(pool, paid.order_id, "cancelled")
    assert (cancel.outcome, cancel.reason) == ("refused", LifecycleRefusal.PAID_ORDER_NOT_CANCELLABLE)
    refund = move(pool, paid.order_id, "refunded")
    assert (refund.outcome, refund.voided, refund.returned) == ("ok", 1, 0)
    assert move(pool, paid.order_id, "refunded").outcome == "duplicate"
    assert one(
        settings,
        "SELECT c.status, order_id, o.refunded_by FROM codes c JOIN orders o USING (order_id)"
        " WHERE code = %s",
        code,
    ) == ("voided", paid.order_id, "buyer")
    assert (paid.order_id, LifecycleRefusal.PAID_ORDER_NOT_CANCELLABLE) in refusals(settings)
    again = place(pool, member, codes=(code,))
    assert (code, LifecycleRefusal.VOIDED) in refusals(settings)
    assert one(settings, "SELECT discount_cents FROM orders WHERE order_id = %s", again.order_id) == 0
    verify_clean(settings)


@pytest.mark.parametrize(
    ("fulfil", "refunded_by", "status"),
    [
        (False, "merchant", "unused"),  # the seeds: a merchant's refund before fulfilment returns them
        (True, "merchant", "voided"),  # after fulfilment, even the merchant's refund voids them
        (False, "buyer", "voided"),  # the buyer's refund after payment voids them
        (True, "buyer", "voided"),
    ],
)
def test_a_refund_returns_or_voids_coupons_as_the_seeds_say(settings, pool, fulfil, refunded_by, status):
    act = activity_with(settings, budget=5)
    member, (code,), _ = member_with_package(pool, settings, act["slug"])
    order = place(pool, member, codes=(code,))
    move(pool, order.order_id, "paid")
    if fulfil:
        assert move(pool, order.order_id, "fulfilled").outcome == "ok"
    refund = move(pool, order.order_id, "refunded", refunded_by=refunded_by)
    assert refund.outcome == "ok"
    assert (refund.returned, refund.voided) == ((1, 0) if status == "unused" else (0, 1))
    assert one(settings, "SELECT status FROM codes WHERE code = %s", code) == status
    # Idempotent: the same refund again, or the other initiator's, moves nothing.
    assert move(pool, order.order_id, "refunded", refunded_by="buyer").outcome == "duplicate"
    assert one(settings, "SELECT status FROM codes WHERE code = %s", code) == status
    verify_clean(settings)


def test_a_merchant_refund_returns_an_expired_coupon_as_expired(settings, pool):
    act = activity_with(settings, budget=5)
    member, (code,), _ = member_with_package(pool, settings, act["slug"])
    order = place(pool, member, codes=(code,))
    move(pool, order.order_id, "paid")
    with psycopg.connect(settings.database_url) as conn:
        conn.execute("UPDATE codes SET expires_at = now() - interval '1 minute' WHERE code = %s", (code,))
    move(pool, order.order_id, "refunded", refunded_by="merchant")
    assert one(settings, "SELECT status, order_id FROM codes WHERE code = %s", code) == ("expired", None)
    verify_clean(settings)


def test_the_database_keeps_a_voided_coupon_voided(settings, pool):
    act = activity_with(settings, budget=5, codes=5)
    member, (code,), _ = member_with_package(pool, settings, act["slug"])
    order = place(pool, member, codes=(code,))
    move(pool, order.order_id, "paid")
    move(pool, order.order_id, "refunded")
    for change in (
        "status = 'unused', order_id = NULL, voided_at = NULL",
        "status = 'used', voided_at = NULL",
        "status = 'expired', order_id = NULL, voided_at = NULL",
    ):
        with psycopg.connect(settings.database_url) as conn, pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(f"UPDATE codes SET {change} WHERE code = %s", (code,))
    # Nor can a coupon that never was in a wallet be voided.
    with psycopg.connect(settings.database_url) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(
            "UPDATE codes SET status = 'voided', voided_at = now()"
            " WHERE code = (SELECT code FROM codes WHERE status = 'available' LIMIT 1)"
        )
    # An operator cannot cancel it either.
    with (
        psycopg.connect(settings.database_url) as conn,
        pytest.raises(catalog.BackOfficeError, match="voided"),
    ):
        catalog.cancel_coupon(conn, code, utcnow())
    assert one(settings, "SELECT status FROM codes WHERE code = %s", code) == "voided"


def test_a_cancelled_order_returns_an_expired_coupon_as_expired(settings, pool):
    act = activity_with(settings, budget=5)
    member, (code,), _ = member_with_package(pool, settings, act["slug"])
    order = place(pool, member, codes=(code,))
    with psycopg.connect(settings.database_url) as conn:
        conn.execute("UPDATE codes SET expires_at = now() - interval '1 minute' WHERE code = %s", (code,))
    move(pool, order.order_id, "cancelled")
    assert one(settings, "SELECT status FROM codes WHERE code = %s", code) == "expired"
    verify_clean(settings)


def test_refund_needs_payment_and_status_before_order_is_retried(settings, pool):
    act = activity_with(settings, budget=5)
    member, _, _ = member_with_package(pool, settings, act["slug"])
    order = place(pool, member)
    refused = move(pool, order.order_id, "refunded")
    assert refused.reason is LifecycleRefusal.NOT_PAID
    with pytest.raises(OrderNotYetKnown):
        move(pool, "SO-not-placed-yet", "paid")


def test_expiry_is_the_end_of_claim_date_plus_n_days_in_the_activity_zone(settings, pool):
    act = activity_with(settings, validity_days=3, timezone="America/New_York")
    _, (code,), claim_id = member_with_package(pool, settings, act["slug"])
    requested = one(settings, "SELECT requested_at FROM claims WHERE claim_id = %s", claim_id)
    zone = ZoneInfo("America/New_York")
    local_day = requested.astimezone(zone).date() + timedelta(days=4)
    expected = datetime(local_day.year, local_day.month, local_day.day, tzinfo=zone)
    assert one(settings, "SELECT expires_at FROM codes WHERE code = %s", code) == expected.astimezone(UTC)

    until = utcnow() + timedelta(days=10)
    fixed = activity_with(settings, validity_days=None, valid_until=until)
    _, (fixed_code,), _ = member_with_package(pool, settings, fixed["slug"])
    assert one(settings, "SELECT expires_at FROM codes WHERE code = %s", fixed_code) == until


def test_the_sweep_expires_only_coupons_past_expiry_and_is_idempotent(settings, pool):
    act = activity_with(settings, budget=10)
    coupons = [member_with_package(pool, settings, act["slug"])[1][0] for _ in range(3)]
    member, (used,), _ = member_with_package(pool, settings, act["slug"])
    place(pool, member, codes=(used,))
    with psycopg.connect(settings.database_url) as conn:
        conn.execute(
            "UPDATE codes SET expires_at = now() - interval '1 second' WHERE code = ANY(%s)",
            ([*coupons[:2], used],),
        )
    with psycopg.connect(settings.database_url) as conn:
        assert catalog.expire_coupons(conn, utcnow(), chunk=1) == 2
        assert catalog.expire_coupons(conn, utcnow()) == 0
    statuses = dict(
        (c, one(settings, "SELECT status FROM codes WHERE code = %s", c)) for c in [*coupons, used]
    )
    assert statuses == {coupons[0]: "expired", coupons[1]: "expired", coupons[2]: "unused", used: "used"}
    verify_clean(settings)


def test_operators_cancel_unused_or_unissued_coupons_but_not_used_ones(settings, pool):
    act = activity_with(settings, budget=5, codes=5)
    _, (code,), _ = member_with_package(pool, settings, act["slug"])
    spare = one(settings, "SELECT code FROM codes WHERE status = 'available' LIMIT 1")
    with psycopg.connect(settings.database_url) as conn:
        assert catalog.cancel_coupon(conn, code, utcnow())
        assert not catalog.cancel_coupon(conn, code, utcnow()), "cancelling twice changes nothing"
        assert catalog.cancel_coupon(conn, spare, utcnow())
        with pytest.raises(catalog.BackOfficeError, match="no such coupon code"):
            catalog.cancel_coupon(conn, "ZZZZZZZZZZZZ", utcnow())
    other, (used,), _ = member_with_package(pool, settings, act["slug"])
    place(pool, other, codes=(used,))
    with (
        psycopg.connect(settings.database_url) as conn,
        pytest.raises(catalog.BackOfficeError, match="already used"),
    ):
        catalog.cancel_coupon(conn, used, utcnow())
    assert one(settings, "SELECT status FROM codes WHERE code = %s", used) == "used"
    report = verify_clean(settings)
    assert report["breaches"]["codes_differ_from_batches"] == 0


def test_the_schema_forbids_a_used_coupon_without_an_order(settings, pool):
    act = activity_with(settings, budget=5)
    _, (code,), _ = member_with_package(pool, settings, act["slug"])
    with psycopg.connect(settings.database_url) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(
            "UPDATE codes SET status = 'used', used_at = now(), discount_cents = 0 WHERE code = %s", (code,)
        )
    with psycopg.connect(settings.database_url) as conn, pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute(
            "UPDATE codes SET status = 'used', order_id = 'SO-none', used_at = now(), discount_cents = 0"
            " WHERE code = %s",
            (code,),
        )


def test_verify_catches_codes_missing_from_their_batch_and_coupons_of_cancelled_orders(settings, pool):
    act = activity_with(settings, budget=5, codes=5)
    member, (code,), _ = member_with_package(pool, settings, act["slug"])
    order = place(pool, member, codes=(code,))
    with psycopg.connect(settings.database_url) as conn:
        conn.execute(
            "DELETE FROM codes WHERE code = (SELECT code FROM codes WHERE status = 'available' LIMIT 1)"
        )
        conn.execute(
            "UPDATE orders SET status = 'cancelled', cancelled_at = now() WHERE order_id = %s",
            (order.order_id,),
        )
    from issuance.shared.db.verify import verify

    with psycopg.connect(settings.database_url) as conn:
        report = verify(conn).as_json()
    assert report["breaches"]["codes_differ_from_batches"] == 1
    assert report["breaches"]["used_coupon_without_order"] == 1
