"""Coupon rules and member identity against real PostgreSQL: the validity
window on the asynchronous order-placed path and on a claim, the app's member
ID linked by member-registered and named by orders and the checkout API,
"new user" meaning new to the app, and the template's rules (scope,
stacking, per-person count) applied alike by the checkout API and the
order-placed path."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import psycopg
import pytest
from issuance.shared.db import coupon_store
from issuance.shared.wire.messages import MemberRegistered, OrderPlaced, OrderStatusChanged, utcnow
from issuance.workers import lifecycle
from issuance.workers.handlers import handle_claim
from issuance.workers.lifecycle import MemberNotYetKnown, handle_member_registered, record_order

from tests.conftest import claim, verify_clean
from tests.integration.lifecycle_support import (
    activity_with,
    member_with_package,
    one,
    phone,
    place,
    prefix,
    refusals,
    rows,
)
from tests.integration.test_checkout import cart_body, conforms, order_id, serve


@pytest.fixture
def api(pool) -> Iterator[httpx.Client]:
    with serve(pool) as client:
        yield client


def app_id() -> int:
    return 1_000_000 + secrets.randbelow(10**9)


# The validity window ------------------------------------------------------------------


def test_the_order_placed_path_refuses_a_coupon_before_its_window_opens(settings, pool):
    # fails before: the event path read no valid_from, and the coupon was
    # used 15 days before its window opened.
    now = utcnow()
    act = activity_with(
        settings,
        validity_days=None,
        valid_from=now + timedelta(days=15),
        valid_until=now + timedelta(days=30),
        templates=[{"prefix": prefix(), "kind": "gift", "value": 300}],
    )
    member, (code,), _ = member_with_package(pool, settings, act["slug"])
    early = place(pool, member, codes=(code,), at=now)
    assert one(settings, "SELECT status, order_id FROM codes WHERE code = %s", code) == ("unused", None)
    assert refusals(settings) == [(code, "not_yet_valid")]
    # Once the window is open, the same coupon is used.
    place(pool, member, codes=(code,), at=now + timedelta(days=16))
    assert one(settings, "SELECT status FROM codes WHERE code = %s", code) == "used"
    assert one(settings, "SELECT discount_cents FROM orders WHERE order_id = %s", early.order_id) == 0
    verify_clean(settings)


def test_a_claim_expires_after_n_days_but_not_after_the_last_date(settings, pool):
    # fails before: with validity_days set, valid_until was ignored.
    last = utcnow() + timedelta(days=2)
    act = activity_with(settings, validity_days=7, valid_until=last)
    _, (code,), _ = member_with_package(pool, settings, act["slug"])
    assert one(settings, "SELECT expires_at FROM codes WHERE code = %s", code) == last


def test_a_bad_number_of_days_is_one_line_from_the_command(tmp_path, service_env):
    # fails before: -1 reached the database, whose check refused it with a traceback.
    from tests.e2e.test_cli_errors import issuance, one_error_line

    issuance("channel", "create", "app", env=service_env)  # the activity's channel exists
    now = utcnow()
    for days, says in (
        ("-1", "validity_days must be 0 to 3650 days, got -1"),
        ("2.5", "validity_days must be a whole number, got 2.5"),
        ('"7"', "validity_days must be a whole number, got '7'"),
    ):
        spec = tmp_path / "spring.yaml"
        spec.write_text(
            f"slug: spring-{secrets.token_hex(2)}\ntitle: Spring\nchannel: app\nbudget: 5\n"
            f"starts_at: {now.isoformat()}\nends_at: {(now + timedelta(days=1)).isoformat()}\n"
            f"validity_days: {days}\ntemplates:\n- {{prefix: '{prefix()}', kind: gift, value: 300}}\n"
        )
        line = one_error_line(issuance("activity", "create", "--file", str(spec), env=service_env))
        assert says in line, line


# Member identity -------------------------------------------------------------------------


def register(pool, settings, number: str, app_member_id: int, days_ago: float = 0) -> None:
    at = utcnow() - timedelta(days=days_ago)
    message = MemberRegistered(phone=number, registered_at=at, app_member_id=app_member_id)
    handle_member_registered(pool, settings, message)


def test_an_order_by_the_apps_member_id_uses_the_phone_members_coupon(settings, pool, api):
    # fails before: orders could only name the internal member, and an order
    # naming app member 1001 was refused not_owner.
    act = activity_with(settings, templates=[{"prefix": prefix(), "kind": "gift", "value": 300}])
    number, app_member = phone(), app_id()
    member, (code,), _ = member_with_package(pool, settings, act["slug"], number)
    register(pool, settings, number, app_member)
    assert one(settings, "SELECT app_member_id FROM members WHERE member_id = %s", member) == app_member

    # The checkout API lists and reserves by the app's ID.
    listed = api.get(f"/api/app-members/{app_member}/coupons", params={"amount_cents": 1000, "items": 1})
    assert (listed.status_code, conforms(listed.json(), "CouponList")["member_id"]) == (200, member)
    assert [c["code"] for c in listed.json()["coupons"]] == [code]
    body = {**cart_body(member, [code], amount=1000), "app_member_id": app_member}
    del body["member_id"]
    held = api.post(f"/api/orders/{order_id()}/validate", json=body)
    assert (held.status_code, held.json()["outcome"]) == (200, "valid")

    # The order-placed event by the app's ID.
    message = OrderPlaced(
        order_id=order_id(),
        app_member_id=app_member,
        amount_cents=1000,
        placed_at=utcnow(),
        redeemed_codes=(code,),
    )
    assert record_order(pool, message).used == (code,)
    assert one(settings, "SELECT member_id FROM orders WHERE order_id = %s", message.order_id) == member
    assert refusals(settings) == []

    # An app ID no member-registered linked: 404 from the API, retried by the event path.
    stranger = app_id()
    missing = api.get(f"/api/app-members/{stranger}/coupons", params={"amount_cents": 1, "items": 1})
    assert missing.status_code == 404
    body["app_member_id"] = stranger
    refused = api.post(f"/api/orders/{order_id()}/reserve", json=body)
    assert (refused.status_code, refused.json()["reason"]) == (404, "unknown_member")
    early = OrderPlaced(order_id=order_id(), app_member_id=stranger, amount_cents=1, placed_at=utcnow())
    with pytest.raises(MemberNotYetKnown):
        record_order(pool, early)
    verify_clean(settings)


def test_one_app_member_is_one_member(settings, pool):
    first, second, app_member = phone(), phone(), app_id()
    register(pool, settings, first, app_member)
    register(pool, settings, first, app_member)  # again: nothing changes
    register(pool, settings, second, app_member)  # another number claims the same app ID
    linked = rows(settings, "SELECT app_member_id FROM members ORDER BY member_id")
    assert linked == [(app_member,), (None,)]
    assert refusals(settings) == [(f"app:{app_member}", "app_member_conflict")]


def test_a_member_registered_400_days_ago_is_not_a_new_user(settings, pool):
    # fails before: the first claim of a member of long standing got the new-user coupon.
    regular, newcomer_only = prefix(), prefix()
    act = activity_with(
        settings,
        templates=[
            {"prefix": regular, "kind": "gift", "value": 300},
            {"prefix": newcomer_only, "kind": "gift", "value": 500, "new_user_only": True},
        ],
    )
    veteran, newcomer = phone(), phone()
    register(pool, settings, veteran, app_id(), days_ago=400)
    register(pool, settings, newcomer, app_id(), days_ago=1)
    old = handle_claim(pool, settings, claim(act["slug"], veteran))
    new = handle_claim(pool, settings, claim(act["slug"], newcomer))
    assert [c[:3] for c in old.codes] == [regular]
    assert sorted(c[:3] for c in new.codes) == sorted([regular, newcomer_only])
    states = dict(rows(settings, "SELECT claim_id, new_member FROM claims"))
    assert (states[old.claim_id], states[new.claim_id]) == (False, True)


# The template's rules ----------------------------------------------------------------------


def exclusive_and_stackable(settings) -> tuple[str, str, dict[str, Any]]:
    exclusive, stackable = prefix(), prefix()
    act = activity_with(
        settings,
        templates=[
            {"prefix": exclusive, "kind": "amount_off", "value": 800, "stackable": False, "priority": 5},
            {"prefix": stackable, "kind": "gift", "value": 300},
        ],
    )
    return exclusive, stackable, act


def test_an_exclusive_coupon_is_not_stacked_on_either_path(settings, pool, api):
    # fails before: orders stacked two coupons freely.
    exclusive, stackable, act = exclusive_and_stackable(settings)
    member, codes, _ = member_with_package(pool, settings, act["slug"])
    by_prefix = {c[:3]: c for c in codes}
    both = [by_prefix[exclusive], by_prefix[stackable]]

    refused = api.post(f"/api/orders/{order_id()}/reserve", json=cart_body(member, both))
    assert refused.status_code == 409
    assert conforms(refused.json(), "CheckoutAnswer")["refused"] == [
        {
            "code": by_prefix[exclusive],
            "reason": "not_stackable",
            "message": "the coupon cannot be combined with other coupons",
        }
    ]
    # With another promotion in the order, the exclusive coupon does not apply either.
    with_promotion = {**cart_body(member, [by_prefix[exclusive]]), "promotions": True}
    answer = api.post(f"/api/orders/{order_id()}/validate", json=with_promotion).json()
    assert answer["reason"] == "excluded_by_promotion"

    # The event path applies the same rule: the exclusive coupon is refused, the other used.
    outcome = record_order(
        pool,
        OrderPlaced(
            order_id=order_id(),
            member_id=member,
            amount_cents=20_000,
            placed_at=utcnow(),
            redeemed_codes=tuple(both),
        ),
    )
    assert (outcome.used, outcome.refused) == (
        (by_prefix[stackable],),
        ((by_prefix[exclusive], "not_stackable"),),
    )
    assert one(settings, "SELECT status FROM codes WHERE code = %s", by_prefix[exclusive]) == "unused"
    verify_clean(settings)


def test_scope_is_judged_on_the_whole_cart(settings, pool, api):
    shoes, store = prefix(), prefix()
    act = activity_with(
        settings,
        templates=[
            {
                "prefix": shoes,
                "kind": "discount_rate",
                "value": 1000,
                "scope_categories": ["shoes"],
                "min_items": 2,
            },
            {"prefix": store, "kind": "gift", "value": 300, "scope_stores": ["S1"], "min_member_level": 2},
        ],
    )
    member, codes, _ = member_with_package(pool, settings, act["slug"])
    by_prefix = {c[:3]: c for c in codes}
    cart = {
        "member_id": member,
        "amount_cents": 10_000,
        "items": 3,
        "lines": [
            {"product": "P-SHOE", "category": "shoes", "amount_cents": 6000, "quantity": 2},
            {"product": "P-BOOK", "category": "books", "amount_cents": 4000},
        ],
        "store": "S1",
        "member_level": 2,
    }
    listed = conforms(api.post("/api/carts/coupons", json=cart).json(), "CouponList")
    savings = {c["code"]: (c["applicable"], c["discount_cents"]) for c in listed["coupons"]}
    assert savings == {by_prefix[shoes]: (True, 600), by_prefix[store]: (True, 300)}
    assert {c["code"]: c["rules"]["scope_categories"] for c in listed["coupons"]}[by_prefix[shoes]] == [
        "shoes"
    ]
    # The same member at level 1, in store S2, without lines: each coupon says why not.
    plain = api.get(f"/api/members/{member}/coupons", params={"amount_cents": 10_000, "items": 3}).json()
    assert {c["code"]: c["reason"] for c in plain["coupons"]} == {
        by_prefix[shoes]: "no_eligible_items",
        by_prefix[store]: "wrong_store",
    }
    lower = {**cart, "member_level": 1}
    reasons = {c["code"]: c["reason"] for c in api.post("/api/carts/coupons", json=lower).json()["coupons"]}
    assert reasons[by_prefix[store]] == "member_level_too_low"
    # Reserved against the whole cart, the saving is the one listed.
    reserved = api.post(f"/api/orders/{order_id()}/reserve", json={**cart, "codes": [by_prefix[shoes]]})
    assert (reserved.status_code, reserved.json()["discount_cents"]) == (200, 600)
    verify_clean(settings)


def rebate_coupon(settings, member: int, template_prefix: str) -> str:
    """A second coupon of a template for a member, the way a rebate binds one."""
    with psycopg.connect(settings.database_url) as conn:
        template_id, activity_id = conn.execute(
            "SELECT template_id, activity_id FROM coupon_templates WHERE prefix = %s", (template_prefix,)
        ).fetchone()
        (rebate_id,) = conn.execute(
            "INSERT INTO rebates (referrer_member_id, activity_id, rebate_no, template_id)"
            " VALUES (%s, %s, 1, %s) RETURNING rebate_id",
            (member, activity_id, template_id),
        ).fetchone()
        now = utcnow()
        code = coupon_store.bind_rebate_code(
            conn,
            rebate_id=rebate_id,
            member=member,
            template=template_id,
            now=now,
            expires_at=now + timedelta(days=7),
        )
    assert code is not None
    return code


def test_the_per_person_count_holds_across_orders(settings, pool):
    limited = prefix()
    act = activity_with(
        settings, templates=[{"prefix": limited, "kind": "gift", "value": 300, "per_person_limit": 1}]
    )
    member, (first,), _ = member_with_package(pool, settings, act["slug"])
    second = rebate_coupon(settings, member, limited)
    place(pool, member, codes=(first,))
    place(pool, member, codes=(second,))
    assert refusals(settings) == [(second, "per_person_limit")]
    assert one(settings, "SELECT status FROM codes WHERE code = %s", second) == "unused"
    # Given back (the first order cancelled before payment), the count frees up again.
    order = one(settings, "SELECT order_id FROM codes WHERE code = %s", first)
    lifecycle.handle_order_status(
        pool, OrderStatusChanged(order_id=order, status="cancelled", changed_at=utcnow())
    )
    place(pool, member, codes=(second,))
    assert one(settings, "SELECT status FROM codes WHERE code = %s", second) == "used"
