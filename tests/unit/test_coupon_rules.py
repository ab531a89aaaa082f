"""Coupon rules as data: the validity window ("N days, but not after date
D"), the values an operator types checked with a clear message, scope,
stacking, priority and the per-person count evaluated by the one set of
checkout rule functions, and "new user" meaning new to the app."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from issuance.shared.backoffice import catalog
from issuance.shared.domain import TemplateRef, coupon_expiry, is_new_user
from issuance.shared.domain.checkout import (
    Cart,
    CartLine,
    CouponRules,
    WalletCoupon,
    choose,
    eligible,
    evaluate,
    options_for,
    rules_problem,
)
from issuance.shared.domain.claims import (
    ActivityRules,
    ActivityTerms,
    ClaimRequest,
    Granted,
    Stock,
    decide_claims,
)
from issuance.shared.domain.coupons import LifecycleRefusal
from issuance.shared.errors import InvalidMessage, OperatorError
from issuance.shared.wire.messages import MemberRegistered, OrderPlaced

NOW = datetime(2026, 11, 30, 12, tzinfo=UTC)
MEMBER = 7


def coupon(code: str = "AAA0000001", rules: CouponRules | None = None, **overrides: Any) -> WalletCoupon:
    values: dict[str, Any] = {
        "code": code,
        "member_id": MEMBER,
        "kind": "amount_off",
        "value": 500,
        "threshold_cents": 0,
        "valid_from": None,
        "expires_at": NOW + timedelta(days=3),
        "status": "unused",
        "template_id": 1,
        "rules": rules or CouponRules(),
    }
    values.update(overrides)
    return WalletCoupon(**values)


def cart(amount: int = 10_000, items: int = 3, **overrides: Any) -> Cart:
    return Cart(amount_cents=amount, items=items, at=NOW, **overrides)


SHOES = CartLine(product="P-SHOE", category="shoes", amount_cents=6000, quantity=2)
BOOK = CartLine(product="P-BOOK", category="books", amount_cents=4000, quantity=1)


# The validity window ------------------------------------------------------------


def test_n_days_but_not_after_the_last_date():
    # fails before: with both set, N days won and the last date was ignored.
    last = datetime(2026, 12, 3, 16, tzinfo=UTC)
    capped = coupon_expiry(NOW, zone="Asia/Shanghai", validity_days=7, valid_until=last)
    assert capped == last
    uncapped = coupon_expiry(NOW, zone="Asia/Shanghai", validity_days=7, valid_until=None)
    assert uncapped > last
    # A last date after the N days changes nothing.
    later = uncapped + timedelta(days=30)
    assert coupon_expiry(NOW, zone="Asia/Shanghai", validity_days=7, valid_until=later) == uncapped


@pytest.mark.parametrize("days", [2.5, "7", -1, True])
def test_the_expiry_rule_refuses_a_number_of_days_that_is_not_one(days):
    with pytest.raises(ValueError, match="whole number of days"):
        coupon_expiry(NOW, zone="Asia/Shanghai", validity_days=days, valid_until=None)


def activity(**changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "slug": "spring",
        "title": "Spring",
        "channel": "app",
        "starts_at": "2026-12-01T00:00:00+08:00",
        "ends_at": "2026-12-31T00:00:00+08:00",
        "budget": 10,
        "templates": [{"prefix": "SPR", "kind": "gift", "value": 300}],
    }
    values.update(changes)
    return values


def refusal(values: dict[str, Any]) -> str:
    """The one-line message the back office (form, file or CLI) refuses with."""
    with pytest.raises(OperatorError) as caught:
        catalog.ActivitySpec.from_mapping(values).check()
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"validity_days": 2.5}, "validity_days must be a whole number, got 2.5"),
        ({"validity_days": "7"}, "validity_days must be a whole number, got '7'"),
        # fails before: -1 passed the checks and the database refused it with a traceback.
        ({"validity_days": -1}, "validity_days must be 0 to 3650 days, got -1"),
        ({"validity_days": 3651}, "validity_days must be 0 to 3650 days, got 3651"),
        (
            {"valid_from": "2026-12-10T00:00:00+08:00", "valid_until": "2026-12-09T00:00:00+08:00"},
            "the validity window must end (valid_until) after it starts (valid_from)",
        ),
        ({"valid_until": "2026-12-09T00:00:00"}, "the validity window's times need a UTC offset"),
        (
            {"validity_days": None, "valid_until": "2026-11-01T00:00:00+08:00"},
            "the validity window must end (valid_until) after the activity starts",
        ),
    ],
)
def test_a_bad_validity_is_refused_with_a_clear_message(changes, says):
    assert says in refusal(activity(**changes))


def test_n_days_with_a_last_date_and_a_first_date_is_a_valid_activity():
    spec = catalog.ActivitySpec.from_mapping(
        activity(
            validity_days=7,
            valid_from="2026-12-05T00:00:00+08:00",
            valid_until="2026-12-20T00:00:00+08:00",
        )
    )
    spec.check()
    assert (spec.validity_days, spec.valid_until) == (7, datetime.fromisoformat("2026-12-20T00:00:00+08:00"))


# The rules, as an operator types them ----------------------------------------------------


def template(**rules: Any) -> dict[str, Any]:
    return {"prefix": "SPR", "kind": "amount_off", "value": 500, "threshold_cents": 1000, **rules}


@pytest.mark.parametrize(
    ("rules", "says"),
    [
        ({"min_items": 2.5}, "min_items must be a whole number, got 2.5"),
        ({"priority": "7"}, "priority must be a whole number, got '7'"),
        ({"per_person_limit": -1}, "template SPR: per_person_limit must be a whole number from 1"),
        ({"per_person_limit": 0}, "template SPR: per_person_limit must be a whole number from 1"),
        ({"min_member_level": -1}, "template SPR: min_member_level must be a whole number from 0 to 1000"),
        ({"priority": 1001}, "template SPR: priority must be a whole number from 0 to 1000, got 1001"),
        ({"min_items": True}, "min_items must be a whole number, got True"),
        ({"stackable": "no"}, "stackable must be true or false, got 'no'"),
        ({"scope_stores": "S1"}, "scope_stores must be a list of names, got 'S1'"),
        ({"scope_products": [1, 2]}, "scope_products must be a list of names (text)"),
        ({"scope_categories": [""]}, "template SPR: scope categories must hold names of 1 to 64 characters"),
        (
            {"scope_products": ["x" * 65]},
            "template SPR: scope products must hold names of 1 to 64 characters",
        ),
        ({"colour": "red"}, "unexpected keyword argument 'colour'"),
    ],
)
def test_a_bad_rule_is_refused_with_a_clear_message(rules, says):
    assert says in refusal(activity(templates=[template(**rules)]))


def test_rules_are_kept_on_the_template_and_written_back_to_its_file():
    rules = {"scope_stores": ["S2", "S1", "S1"], "stackable": False, "priority": 5, "per_person_limit": 2}
    spec = catalog.ActivitySpec.from_mapping(activity(templates=[template(**rules)]))
    spec.check()
    (written,) = spec.templates
    assert written.rules() == CouponRules(
        stores=frozenset({"S1", "S2"}), stackable=False, priority=5, per_person_limit=2
    )
    text = catalog.activity_file_text(spec)
    assert "scope_stores: [S1, S2]" in text and "stackable: false" in text
    assert "min_items" not in text  # a rule left at its default is not written
    # The file reads back as the same activity.
    import yaml

    assert catalog.ActivitySpec.from_mapping(yaml.safe_load(text)) == spec


@given(
    st.builds(
        CouponRules,
        min_items=st.one_of(st.integers(-5, 5), st.floats(0, 5), st.text(max_size=2), st.booleans()),
        priority=st.one_of(st.integers(-5, 1005), st.floats(0, 5)),
        per_person_limit=st.one_of(st.none(), st.integers(-3, 3), st.floats(0, 3)),
    )
)
def test_rules_problem_accepts_exactly_whole_numbers_in_range(rules):
    def whole(value: object, low: int, high: int) -> bool:
        return type(value) is int and low <= value <= high

    expected = (
        whole(rules.min_items, 0, 1_000_000)
        and whole(rules.priority, 0, 1000)
        and (rules.per_person_limit is None or whole(rules.per_person_limit, 1, 1_000_000))
    )
    assert (rules_problem(rules) is None) == expected


# Scope, stacking, priority, per-person count -------------------------------------------


@pytest.mark.parametrize(
    ("rules", "the_cart", "reason"),
    [
        (CouponRules(stores=frozenset({"S1"})), cart(store="S2"), LifecycleRefusal.WRONG_STORE),
        (CouponRules(stores=frozenset({"S1"})), cart(), LifecycleRefusal.WRONG_STORE),
        (CouponRules(min_member_level=3), cart(member_level=2), LifecycleRefusal.MEMBER_LEVEL_TOO_LOW),
        (CouponRules(stackable=False), cart(promotions=True), LifecycleRefusal.EXCLUDED_BY_PROMOTION),
        (
            CouponRules(products=frozenset({"P-HAT"})),
            cart(lines=(SHOES, BOOK)),
            LifecycleRefusal.NO_ELIGIBLE_ITEMS,
        ),
        # A cart that does not say what it holds meets no product scope.
        (CouponRules(categories=frozenset({"shoes"})), cart(), LifecycleRefusal.NO_ELIGIBLE_ITEMS),
        (CouponRules(min_items=4), cart(items=3), LifecycleRefusal.TOO_FEW_ITEMS),
        (
            CouponRules(categories=frozenset({"shoes"}), min_items=3),
            cart(lines=(SHOES, BOOK)),
            LifecycleRefusal.TOO_FEW_ITEMS,
        ),
        (CouponRules(per_person_limit=1), cart(), LifecycleRefusal.PER_PERSON_LIMIT),
    ],
)
def test_each_rule_refuses_with_its_reason(rules, the_cart, reason):
    uses = 1 if rules.per_person_limit else 0
    option = evaluate(coupon(rules=rules, member_uses=uses), the_cart, member_id=MEMBER)
    assert (option.reason, option.discount_cents) == (reason, 0)


def test_a_scoped_coupon_counts_threshold_and_saving_on_its_lines_only():
    shoes_only = CouponRules(categories=frozenset({"shoes"}))
    the_cart = cart(amount=10_000, lines=(SHOES, BOOK), store="S1", member_level=2)
    assert eligible(shoes_only, the_cart) == (6000, 2)
    # 10% of the shoes, not of the cart.
    rate = coupon(kind="discount_rate", value=1000, rules=shoes_only)
    assert evaluate(rate, the_cart, member_id=MEMBER).discount_cents == 600
    # The threshold is met by the cart, not by the shoes.
    above = coupon(threshold_cents=7000, rules=shoes_only)
    assert evaluate(above, the_cart, member_id=MEMBER).reason is LifecycleRefusal.BELOW_THRESHOLD
    everything = CouponRules(
        products=frozenset({"P-BOOK"}), stores=frozenset({"S1"}), min_member_level=2, min_items=1
    )
    assert evaluate(coupon(rules=everything), the_cart, member_id=MEMBER).discount_cents == 500


def test_an_exclusive_coupon_goes_alone():
    # fails before: orders stacked two coupons freely.
    exclusive = coupon("AAA0000001", rules=CouponRules(stackable=False), value=800)
    other = coupon("AAA0000002", template_id=2, value=300)
    chosen = choose([exclusive.code, other.code], [exclusive, other], cart(), member_id=MEMBER)
    assert not chosen.accepted
    assert chosen.refused == ((exclusive.code, LifecycleRefusal.NOT_STACKABLE),)
    alone = choose([exclusive.code], [exclusive, other], cart(), member_id=MEMBER)
    assert (alone.accepted, alone.discount_cents) == (True, 800)
    two_stackable = choose(
        [other.code, "AAA0000003"], [other, coupon("AAA0000003")], cart(), member_id=MEMBER
    )
    assert (two_stackable.accepted, two_stackable.discount_cents) == (True, 800)


def test_the_per_person_count_holds_across_orders_and_within_one():
    once = CouponRules(per_person_limit=2)
    a, b, c = (coupon(f"AAA000000{n}", rules=once) for n in (1, 2, 3))
    # None used before: two of the three.
    chosen = choose([a.code, b.code, c.code], [a, b, c], cart(), member_id=MEMBER)
    assert chosen.refused == ((c.code, LifecycleRefusal.PER_PERSON_LIMIT),)
    # One used in an earlier order: one more.
    used_one = [dataclasses.replace(x, member_uses=1) for x in (a, b)]
    chosen = choose([a.code, b.code], used_one, cart(), member_id=MEMBER)
    assert chosen.refused == ((b.code, LifecycleRefusal.PER_PERSON_LIMIT),)


def test_priority_breaks_a_tie_in_saving_before_the_expiry():
    soon = coupon("AAA0000001", expires_at=NOW + timedelta(days=1))
    preferred = coupon("AAA0000002", expires_at=NOW + timedelta(days=9), rules=CouponRules(priority=10))
    bigger = coupon("AAA0000003", value=600)
    ranked = [o.coupon.code for o in options_for([soon, preferred, bigger], cart(), member_id=MEMBER)]
    assert ranked == [bigger.code, preferred.code, soon.code]


names = st.sampled_from(["P1", "P2", "P3", "C1", "C2"])
lines = st.builds(
    CartLine,
    product=names,
    category=names,
    amount_cents=st.integers(0, 5000),
    quantity=st.integers(1, 4),
)
rule_sets = st.builds(
    CouponRules,
    products=st.frozensets(names, max_size=2),
    categories=st.frozensets(names, max_size=2),
    stores=st.frozensets(st.sampled_from(["S1", "S2"]), max_size=1),
    min_items=st.integers(0, 5),
    min_member_level=st.integers(0, 3),
    stackable=st.booleans(),
    priority=st.integers(0, 3),
    per_person_limit=st.one_of(st.none(), st.integers(1, 2)),
)
carts = st.builds(
    Cart,
    amount_cents=st.integers(0, 30_000),
    items=st.integers(0, 6),
    at=st.just(NOW),
    lines=st.lists(lines, max_size=4).map(tuple),
    store=st.one_of(st.none(), st.sampled_from(["S1", "S2"])),
    member_level=st.integers(0, 3),
    promotions=st.booleans(),
)
wallets = st.lists(
    st.builds(
        coupon,
        code=st.just(""),
        rules=rule_sets,
        kind=st.sampled_from(["discount_rate", "amount_off", "gift"]),
        value=st.integers(1, 5000),
        threshold_cents=st.integers(0, 10_000),
        template_id=st.integers(1, 3),
        member_uses=st.integers(0, 2),
    ),
    max_size=6,
).map(lambda cs: [dataclasses.replace(c, code=f"AAA{n:07d}") for n, c in enumerate(cs)])


@given(wallets, carts)
def test_properties_of_rules_over_any_wallet_and_cart(wallet, the_cart):
    for c in wallet:
        option = evaluate(c, the_cart, member_id=MEMBER)
        amount, _ = eligible(c.rules, the_cart)
        assert 0 <= amount <= the_cart.amount_cents
        assert 0 <= option.discount_cents <= amount
        # With no rules, a coupon saves at least as much: a rule only restricts.
        free = evaluate(dataclasses.replace(c, rules=CouponRules()), the_cart, member_id=MEMBER)
        assert free.discount_cents >= option.discount_cents
        if not option.applicable:
            assert option.discount_cents == 0
    chosen = choose([c.code for c in wallet], wallet, the_cart, member_id=MEMBER)
    assert chosen.discount_cents <= the_cart.amount_cents
    kept = {code for code, _ in chosen.lines}
    by_code = {c.code: c for c in wallet}
    if len(wallet) > 1:
        assert all(by_code[code].rules.stackable for code in kept)
    for template_id in {c.template_id for c in wallet}:
        of_template = [by_code[code] for code in kept if by_code[code].template_id == template_id]
        for c in of_template:
            if c.rules.per_person_limit is not None:
                assert c.member_uses + len(of_template) <= c.rules.per_person_limit


# New to the app ---------------------------------------------------------------------------


def test_a_member_of_the_app_for_400_days_is_not_a_new_user():
    assert is_new_user(holds_packages=False, registered_at=None, at=NOW)
    assert is_new_user(holds_packages=False, registered_at=NOW - timedelta(days=1), at=NOW)
    assert not is_new_user(holds_packages=False, registered_at=NOW - timedelta(days=400), at=NOW)
    assert not is_new_user(holds_packages=True, registered_at=None, at=NOW)


def test_a_first_claim_by_a_long_standing_app_member_gets_no_new_user_coupon():
    # fails before: "new user" read only the packages held, so a member
    # registered 400 days ago got the new-user template on a first claim.
    terms = ActivityTerms(
        activity_id=1,
        slug="spring",
        rules=ActivityRules(starts_at=NOW - timedelta(days=1), ends_at=NOW + timedelta(days=1), online=True),
        timezone="Asia/Shanghai",
        exclusivity_group="solo:spring",
        validity_days=7,
        valid_until=None,
        hold_until_registered=False,
        templates=(
            TemplateRef(template_id=1, new_user_only=False),
            TemplateRef(template_id=2, new_user_only=True),
        ),
    )

    def first_claim(registered_at: datetime | None) -> Granted:
        request = ClaimRequest(
            claim_id=uuid.uuid4(),
            activity=terms,
            requested_at=NOW,
            phone="+8613800138000",
            member_id=MEMBER,
            registered_at=registered_at,
        )
        stock = Stock(slots={1: [1]}, codes={1: ["AAA0000001"], 2: ["BBB0000001"]})
        (decision,) = decide_claims([request], holdings={}, stock=stock, now=NOW, credit_inline=True)
        assert isinstance(decision, Granted)
        return decision

    veteran = first_claim(NOW - timedelta(days=400))
    assert ([t.template_id for t in veteran.templates], veteran.new_member) == ([1], False)
    newcomer = first_claim(NOW - timedelta(days=2))
    assert ([t.template_id for t in newcomer.templates], newcomer.new_member) == ([1, 2], True)


# The messages name the app's member ID ----------------------------------------------------


def test_member_registered_carries_the_app_member_id():
    message = MemberRegistered.from_payload(MemberRegistered.EXAMPLE)
    assert message.app_member_id == 1001
    assert MemberRegistered.json_schema()["properties"]["app_member_id"]


def test_an_order_names_exactly_one_of_the_two_member_ids():
    base = {"v": 1, "order_id": "SO-1", "amount_cents": 100, "placed_at": "2026-11-30T12:00:00Z"}
    assert OrderPlaced.from_payload({**base, "app_member_id": 1001}).app_member_id == 1001
    assert OrderPlaced.from_payload({**base, "member_id": 7}).member_id == 7
    for ids in ({}, {"member_id": 7, "app_member_id": 1001}):
        with pytest.raises(InvalidMessage, match="exactly one of member_id and app_member_id"):
            OrderPlaced.from_payload({**base, **ids})
