"""Refer three, get one back, against real PostgreSQL: a new member who
claims through a share and pays a first order is one successful referral;
every K of them earn the referrer a rebate, written once; never twice for a
referee, never for self-referral, only on paid orders.

And the fraud rules: only a paid, unrefunded referee order of at least the
minimum amount counts; the referrer's own order must be paid and stay so;
a referee's refund reverses the referral and a rebate no longer earned is
taken back (clawed back, or flagged for review)."""

from __future__ import annotations

import threading
from datetime import timedelta

import psycopg
import pytest
from issuance.shared.wire.messages import MemberRegistered, utcnow
from issuance.workers.lifecycle import handle_member_registered

from tests.conftest import verify_clean
from tests.integration.lifecycle_support import (
    activity_with,
    member_with_package,
    move,
    one,
    phone,
    place,
    prefix,
    refusals,
    rows,
    share_of,
)


def referrer(pool, settings, slug: str, *, pay: bool = True) -> tuple[int, object]:
    """A member (known by number) whose order opened a share of ``slug``
    (paid: only a paid order's share earns rebates)."""
    member, order = referrer_order(pool, settings, slug)
    if pay:
        move(pool, order.order_id, "paid")
    return member, share_of(order)


def referrer_order(pool, settings, slug: str):
    number = phone()
    handle_member_registered(pool, settings, MemberRegistered(phone=number, registered_at=utcnow()))
    member = one(settings, "SELECT max(member_id) FROM members")
    return member, place(pool, member, activity=slug)


def friend_pays(
    pool, settings, slug: str, share, *, pay: bool = True, amount: int = 10_000
) -> tuple[int, str]:
    member, _, _ = member_with_package(pool, settings, slug, share_id=share)
    order = place(pool, member, activity=slug, amount=amount)
    if pay:
        move(pool, order.order_id, "paid")
    return member, order.order_id


def rebates(settings) -> list[tuple[int, int, int | None]]:
    return [
        tuple(r)
        for r in rows(
            settings, "SELECT referrer_member_id, rebate_no, amount_cents FROM rebates ORDER BY rebate_no"
        )
    ]


def test_every_third_paid_referral_earns_one_rebate(settings, pool):
    act = activity_with(settings, rebate_amount_cents=1000)
    me, share = referrer(pool, settings, act["slug"])
    friends = [friend_pays(pool, settings, act["slug"], share) for _ in range(2)]
    assert rebates(settings) == []
    friends.append(friend_pays(pool, settings, act["slug"], share))
    assert rebates(settings) == [(me, 1, 1000)]
    friends += [friend_pays(pool, settings, act["slug"], share) for _ in range(3)]
    assert rebates(settings) == [(me, 1, 1000), (me, 2, 1000)]
    assert one(settings, "SELECT count(*) FROM referrals WHERE referrer_member_id = %s", me) == 6
    # A second paid order of a friend, or the same payment again, counts nothing.
    member, _ = friends[0]
    again = place(pool, member)
    move(pool, again.order_id, "paid")
    assert move(pool, friends[1][1], "paid").outcome == "duplicate"
    assert one(settings, "SELECT count(*) FROM referrals") == 6
    assert len(rebates(settings)) == 2
    verify_clean(settings)


def test_the_threshold_is_configurable_and_a_rebate_can_be_a_coupon(settings, pool):
    rewards_prefix = prefix()
    activity_with(
        settings,
        budget=0,
        codes=5,
        validity_days=30,
        templates=[{"prefix": rewards_prefix, "kind": "amount_off", "value": 2000}],
    )
    act = activity_with(settings, rebate_every=2, rebate_template=rewards_prefix)
    me, share = referrer(pool, settings, act["slug"])
    for _ in range(2):
        friend_pays(pool, settings, act["slug"], share)
    code = one(settings, "SELECT code FROM rebates WHERE referrer_member_id = %s AND rebate_no = 1", me)
    assert code is not None and code.startswith(rewards_prefix)
    assert one(settings, "SELECT status, member_id FROM codes WHERE code = %s", code) == ("unused", me)
    # The rebate coupon is in the wallet: the referrer can use it.
    order = place(pool, me, codes=(code,))
    assert one(settings, "SELECT status, order_id FROM codes WHERE code = %s", code) == (
        "used",
        order.order_id,
    )
    verify_clean(settings)


def test_only_paid_orders_of_new_members_through_the_share_count(settings, pool):
    act = activity_with(settings, rebate_every=1, rebate_amount_cents=500)
    me, share = referrer(pool, settings, act["slug"])
    unpaid_member, unpaid = friend_pays(pool, settings, act["slug"], share, pay=False)  # placed, not paid
    _, cancelled = friend_pays(pool, settings, act["slug"], share, pay=False)
    move(pool, cancelled, "cancelled")
    # Not a new member: had a package on the platform before claiming through the share.
    other = activity_with(settings)
    number = phone()
    member_with_package(pool, settings, other["slug"], number)
    member_with_package(pool, settings, act["slug"], number, share_id=share)
    veteran = one(
        settings, "SELECT member_id FROM claims WHERE share_id = %s ORDER BY requested_at DESC LIMIT 1", share
    )
    order = place(pool, veteran)
    move(pool, order.order_id, "paid")
    # Claimed without a share: nobody referred them.
    loner, _, _ = member_with_package(pool, settings, act["slug"])
    lone_order = place(pool, loner)
    move(pool, lone_order.order_id, "paid")
    assert one(settings, "SELECT count(*) FROM referrals") == 0
    assert rebates(settings) == []
    # An order paid before the claim does not count either.
    early_member, _, _ = member_with_package(
        pool, settings, act["slug"], share_id=share, requested_at=utcnow() + timedelta(seconds=30)
    )
    early = place(pool, early_member, at=utcnow() - timedelta(minutes=1))
    move(pool, early.order_id, "paid")
    assert one(settings, "SELECT count(*) FROM referrals") == 0
    # Paying the unpaid one now counts.
    assert one(settings, "SELECT status FROM orders WHERE order_id = %s", unpaid) == "placed"
    move(pool, unpaid, "paid")
    assert one(settings, "SELECT referee_member_id FROM referrals") == unpaid_member
    assert rebates(settings) == [(me, 1, 500)]
    verify_clean(settings)


def test_self_referral_never_counts(settings, pool):
    act = activity_with(settings, rebate_every=1, rebate_amount_cents=500)
    number = phone()
    handle_member_registered(pool, settings, MemberRegistered(phone=number, registered_at=utcnow()))
    me = one(settings, "SELECT member_id FROM members")
    share = share_of(place(pool, me, activity=act["slug"]))
    # The buyer claims through their own share with their own number.
    member, _, _ = member_with_package(pool, settings, act["slug"], number, share_id=share)
    assert member == me
    order = place(pool, me)
    move(pool, order.order_id, "paid")
    assert one(settings, "SELECT count(*) FROM referrals") == 0
    assert (str(me), "self_referral") in refusals(settings)
    with psycopg.connect(settings.database_url) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(
            "INSERT INTO referrals (referee_member_id, referrer_member_id, activity_id, share_id, claim_id,"
            " order_id) SELECT %s, %s, activity_id, share_id, claim_id, %s FROM claims LIMIT 1",
            (me, me, order.order_id),
        )
    verify_clean(settings)


def test_the_database_refuses_a_second_rebate_number_or_referee(settings, pool):
    act = activity_with(settings, rebate_every=1, rebate_amount_cents=500)
    me, share = referrer(pool, settings, act["slug"])
    friend, order_id = friend_pays(pool, settings, act["slug"], share)
    activity_id = one(settings, "SELECT activity_id FROM activities WHERE slug = %s", act["slug"])
    with psycopg.connect(settings.database_url) as conn, pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(
            "INSERT INTO rebates (referrer_member_id, activity_id, rebate_no, amount_cents, credited_at)"
            " VALUES (%s, %s, 1, 500, now())",
            (me, activity_id),
        )
    with psycopg.connect(settings.database_url) as conn, pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(
            "INSERT INTO referrals (referee_member_id, referrer_member_id, activity_id, share_id, claim_id,"
            " order_id) SELECT referee_member_id, referrer_member_id + 1000, activity_id, share_id, claim_id,"
            " order_id FROM referrals",
        )
    assert (friend, order_id) == (one(settings, "SELECT referee_member_id, order_id FROM referrals"))


def test_concurrent_referrals_earn_exactly_the_rebates_due(settings, pool):
    act = activity_with(settings, budget=20, rebate_amount_cents=700)
    me, share = referrer(pool, settings, act["slug"])
    orders = []
    for _ in range(6):
        member, _, _ = member_with_package(pool, settings, act["slug"], share_id=share)
        orders.append(place(pool, member).order_id)
    barrier = threading.Barrier(len(orders))
    errors: list[BaseException] = []

    def pay(order_id: str) -> None:
        barrier.wait()
        try:
            move(pool, order_id, "paid")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=pay, args=(o,)) for o in orders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert rebates(settings) == [(me, 1, 700), (me, 2, 700)]
    verify_clean(settings)


def test_referral_farming_with_refunded_one_cent_orders_pays_nothing(settings, pool):
    """Issue 19, item 8: the referrer's own order cancelled; four numbers
    claim through its share, place 1-cent orders, pay, then refund. Before:
    4 referrals, 2 rebates paid, verify clean."""
    act = activity_with(settings, rebate_every=2, rebate_amount_cents=1000)
    me, own = referrer_order(pool, settings, act["slug"])
    move(pool, own.order_id, "cancelled")
    orders = [friend_pays(pool, settings, act["slug"], share_of(own), amount=1)[1] for _ in range(4)]
    for order_id in orders:
        move(pool, order_id, "refunded")
    standing = "SELECT count(*) FROM referrals WHERE referrer_member_id = %s AND reversed_at IS NULL"
    assert one(settings, standing, me) == 0
    assert one(settings, "SELECT count(*) FROM rebates WHERE reversed_at IS NULL") == 0
    verify_clean(settings)


def test_a_referee_order_below_the_minimum_does_not_count_but_a_later_one_does(settings, pool):
    act = activity_with(settings, rebate_every=1, rebate_amount_cents=500)
    me, share = referrer(pool, settings, act["slug"])
    friend, small = friend_pays(pool, settings, act["slug"], share, amount=999)
    assert one(settings, "SELECT count(*) FROM referrals") == 0
    assert (str(friend), "referral_below_minimum") in refusals(settings)
    # The small order does not use up the referee's first qualifying order.
    big = place(pool, friend, amount=1_000)
    assert move(pool, big.order_id, "paid").referral
    assert one(settings, "SELECT order_id FROM referrals") == big.order_id
    assert small != big.order_id
    assert rebates(settings) == [(me, 1, 500)]
    verify_clean(settings)


def test_a_referrer_earns_only_once_their_own_order_is_paid_and_loses_it_on_refund(settings, pool):
    act = activity_with(settings, rebate_every=2, rebate_amount_cents=800)
    me, own = referrer_order(pool, settings, act["slug"])
    for _ in range(2):
        friend_pays(pool, settings, act["slug"], share_of(own))
    assert one(settings, "SELECT count(*) FROM referrals") == 2
    assert rebates(settings) == []  # the referrer's own order is not paid yet
    paid = move(pool, own.order_id, "paid")
    assert paid.rebates == (1,)
    assert rebates(settings) == [(me, 1, 800)]
    # The referrer refunds their own order: the amount already credited is
    # flagged for review, and verify stays clean (it is visible, not hidden).
    refund = move(pool, own.order_id, "refunded")
    assert refund.rebates_reversed == (1,)
    assert rows(settings, "SELECT rebate_no, reversal FROM rebates") == [(1, "review")]
    verify_clean(settings)


def test_a_referee_refund_reverses_the_referral_and_claws_back_an_unused_rebate_coupon(settings, pool):
    rewards_prefix = prefix()
    activity_with(
        settings,
        budget=0,
        codes=5,
        validity_days=30,
        templates=[{"prefix": rewards_prefix, "kind": "amount_off", "value": 2000}],
    )
    act = activity_with(settings, rebate_every=2, rebate_template=rewards_prefix)
    me, share = referrer(pool, settings, act["slug"])
    friends = [friend_pays(pool, settings, act["slug"], share) for _ in range(2)]
    code = one(settings, "SELECT code FROM rebates WHERE referrer_member_id = %s", me)
    assert one(settings, "SELECT status FROM codes WHERE code = %s", code) == "unused"
    refund = move(pool, friends[0][1], "refunded")
    assert (refund.referral_reversed, refund.rebates_reversed) == (True, (1,))
    assert one(settings, "SELECT reversal FROM rebates WHERE code = %s", code) == "clawed_back"
    assert one(settings, "SELECT status FROM codes WHERE code = %s", code) == "voided"
    # Idempotent: the refund delivered again changes nothing.
    assert move(pool, friends[0][1], "refunded").outcome == "duplicate"
    # The reversed referee never counts again, even with a new paid order.
    again = place(pool, friends[0][0])
    move(pool, again.order_id, "paid")
    assert one(settings, "SELECT count(*) FROM referrals WHERE reversed_at IS NULL") == 1
    # A new referee earns the rebate again: a new row, a new coupon.
    friend_pays(pool, settings, act["slug"], share)
    assert rows(settings, "SELECT rebate_no, reversal FROM rebates ORDER BY rebate_id") == [
        (1, "clawed_back"),
        (1, None),
    ]
    verify_clean(settings)


def test_verify_finds_referrals_and_rebates_of_refunded_orders_left_standing(settings, pool):
    act = activity_with(settings, rebate_every=1, rebate_amount_cents=500)
    _, share = referrer(pool, settings, act["slug"])
    _, order_id = friend_pays(pool, settings, act["slug"], share)
    with psycopg.connect(settings.database_url) as conn:
        # What the pipeline did before: the refund recorded, nothing reversed.
        conn.execute(
            "UPDATE orders SET status = 'refunded', refunded_at = now(), refunded_by = 'buyer'"
            " WHERE order_id = %s",
            (order_id,),
        )
    from issuance.shared.db.verify import verify

    with psycopg.connect(settings.database_url) as conn:
        report = verify(conn).as_json()
    assert report["breaches"]["referral_of_refunded_order"] == 1
    assert report["breaches"]["rebate_not_earned"] == 1


def test_concurrent_refunds_and_payments_leave_exactly_the_rebates_earned(settings, pool):
    act = activity_with(settings, budget=30, rebate_amount_cents=700)
    me, share = referrer(pool, settings, act["slug"])
    paid = [friend_pays(pool, settings, act["slug"], share)[1] for _ in range(6)]
    assert len(rebates(settings)) == 2
    waiting = []
    for _ in range(4):
        member, _, _ = member_with_package(pool, settings, act["slug"], share_id=share)
        waiting.append(place(pool, member).order_id)
    moves = [(o, "refunded") for o in paid[:5]] + [(o, "paid") for o in waiting]
    barrier = threading.Barrier(len(moves))
    errors: list[BaseException] = []

    def run(order_id: str, status: str) -> None:
        barrier.wait()
        try:
            move(pool, order_id, status)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=m) for m in moves]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    # 6 - 5 + 4 = 5 standing referrals: one rebate of three stands.
    assert one(settings, "SELECT count(*) FROM referrals WHERE reversed_at IS NULL") == 5
    standing = "SELECT referrer_member_id, rebate_no FROM rebates WHERE reversed_at IS NULL"
    assert rows(settings, standing) == [(me, 1)]
    verify_clean(settings)
