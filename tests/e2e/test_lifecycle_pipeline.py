"""Coupon lifecycle, referral rebates and held credits through the real
pipeline: messages published to RabbitMQ, the actors in worker subprocesses."""

from __future__ import annotations

import psycopg
from issuance.shared.domain import share_id_for
from issuance.shared.wire.messages import MemberRegistered, OrderPlaced, OrderStatusChanged, utcnow
from issuance.shared.wire.publisher import RabbitPublisher

from tests.conftest import claim, verify_clean
from tests.e2e.conftest import wait_for
from tests.integration.lifecycle_support import activity_with, one, rows


def _query(settings, sql: str, *params):
    with psycopg.connect(settings.database_url) as conn:
        return conn.execute(sql, params).fetchall()


def test_orders_use_coupons_pay_earn_a_rebate_and_registration_releases_held_credits(settings, start_workers):
    act = activity_with(settings, rebate_every=2, rebate_amount_cents=500)
    held = activity_with(settings, hold_until_registered=True)
    start_workers(processes=1, threads=4, queues=["claims", "credits", "orders", "members"])
    buyer_order = OrderPlaced(
        order_id="SO-buyer", member_id=999_999, amount_cents=30_000, placed_at=utcnow(), activity=act["slug"]
    )
    friends = [claim(act["slug"], share_id=share_id_for("SO-buyer")) for _ in range(2)]
    waiting = claim(held["slug"], "+8613600136000")
    with RabbitPublisher.from_settings(settings) as publisher:
        publisher.publish_many([buyer_order, *friends, waiting])
        wait_for(
            lambda: (
                one(settings, "SELECT count(*) FROM claims WHERE status = 'credited'") == 2
                and one(settings, "SELECT count(*) FROM held_credits") == 1
            ),
            what="friends credited and the unregistered member held",
        )
        bought = rows(
            settings,
            "SELECT k.member_id, c.code FROM claims k JOIN codes c USING (claim_id)"
            " WHERE k.activity_slug = %s ORDER BY c.code",
            act["slug"],
        )
        orders = [
            OrderPlaced(
                order_id=f"SO-friend-{n}",
                member_id=member,
                amount_cents=10_000,
                placed_at=utcnow(),
                redeemed_codes=(code,),
            )
            for n, (member, code) in enumerate(bought)
        ]
        publisher.publish_many(orders)
        wait_for(lambda: one(settings, "SELECT count(*) FROM orders") == 3, what="orders recorded")
        # The buyer pays too: only a paid order's share earns rebates.
        paid = [
            OrderStatusChanged(order_id=o.order_id, status="paid", changed_at=utcnow())
            for o in (buyer_order, *orders)
        ]
        publisher.publish_many([*paid, *paid])
        publisher.publish_many([MemberRegistered(phone="+8613600136000", registered_at=utcnow())])
        wait_for(
            lambda: (
                one(settings, "SELECT count(*) FROM rebates") == 1
                and one(settings, "SELECT count(*) FROM claims WHERE status = 'credited'") == 3
            ),
            what="the rebate earned and the held credit released",
        )
    assert _query(
        settings, "SELECT status, count(*) FROM codes WHERE claim_id IS NOT NULL GROUP BY status ORDER BY 1"
    ) == [
        ("unused", 1),
        ("used", 2),
    ]
    assert one(settings, "SELECT referrer_member_id, rebate_no, amount_cents FROM rebates") == (
        999_999,
        1,
        500,
    )
    assert one(settings, "SELECT count(*) FROM referrals") == 2
    verify_clean(settings)
    # A friend's refund over the broker: the coupon is voided, the referral
    # reversed, and the rebate already paid flagged for review.
    with RabbitPublisher.from_settings(settings) as publisher:
        refund = OrderStatusChanged(order_id=orders[0].order_id, status="refunded", changed_at=utcnow())
        publisher.publish_many([refund, refund])
        wait_for(
            lambda: one(settings, "SELECT reversal FROM rebates") == "review",
            what="the rebate of a refunded referral taken back",
        )
    assert one(settings, "SELECT count(*) FROM referrals WHERE reversed_at IS NOT NULL") == 1
    assert one(settings, "SELECT status FROM codes WHERE order_id = %s", orders[0].order_id) == "voided"
    verify_clean(settings)
