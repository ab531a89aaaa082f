"""The claim rules of DOMAIN.md, decided by the handler against real PostgreSQL."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import psycopg
import pytest
from issuance.shared.domain import Refusal
from issuance.shared.errors import ConflictingDuplicate
from issuance.shared.wire.messages import CreditRequested
from issuance.workers.handlers import handle_claim, handle_credit

from tests.conftest import claim, make_activity, verify_clean


@pytest.mark.parametrize("inline", [True, False], ids=["credited-inline", "credit-step"])
def test_a_claim_binds_one_code_per_template_and_credits_once(settings, pool, inline):
    act = make_activity(settings, templates=3, codes=5)
    settings = dataclasses.replace(settings, credit_inline=inline)
    outcome = handle_claim(pool, settings, claim(act["slug"], "+8613800138000"))
    assert outcome.status == ("credited" if inline else "bound")
    assert len(outcome.codes) == 3
    assert {c[:3] for c in outcome.codes} == set(act["prefixes"])
    message = CreditRequested(claim_ids=(outcome.claim_id,))
    if not inline:
        assert [c for c, _ in handle_credit(pool, message)] == [outcome.claim_id]
    assert handle_credit(pool, message) == [], "a second credit must write nothing"
    report = verify_clean(settings)
    assert report["counts"]["credits"] == 3
    assert report["counts"]["credited"] == 1


def test_the_same_claim_twice_is_one_package(settings, pool):
    act = make_activity(settings)
    message = claim(act["slug"])
    first = handle_claim(pool, settings, message)
    second = handle_claim(pool, settings, message)
    assert (first.status, first.duplicate) == ("credited", False)
    assert (second.status, second.duplicate) == ("credited", True)
    assert verify_clean(settings)["counts"]["codes_bound"] == 1


def test_the_same_claim_id_with_another_payload_is_a_conflict(settings, pool):
    act = make_activity(settings)
    message = claim(act["slug"], "+8613800138000")
    handle_claim(pool, settings, message)
    with pytest.raises(ConflictingDuplicate):
        handle_claim(pool, settings, claim(act["slug"], "+8613800138001", claim_id=message.claim_id))


def test_one_package_per_number_per_activity(settings, pool):
    act = make_activity(settings)
    handle_claim(pool, settings, claim(act["slug"], "+8613800138000"))
    # The same number typed another way is the same member.
    again = handle_claim(pool, settings, claim(act["slug"], "138 0013 8000"))
    assert (again.status, again.reason) == ("refused", Refusal.ALREADY_RECEIVED)
    verify_clean(settings)


def test_one_package_per_exclusivity_group(settings, pool):
    first = make_activity(settings, group="spring")
    second = make_activity(settings, group="spring")
    assert handle_claim(pool, settings, claim(first["slug"], "+8613800138000")).status == "credited"
    refused = handle_claim(pool, settings, claim(second["slug"], "+8613800138000"))
    assert refused.reason is Refusal.SIMILAR_ACTIVITY
    assert (
        Refusal.SIMILAR_ACTIVITY.text
        == "you have taken part in a similar activity, please check your coupons"
    )


@pytest.mark.parametrize(
    ("starts_in", "online", "reason"),
    [
        (timedelta(hours=1), True, Refusal.NOT_STARTED),
        (timedelta(days=-3), True, Refusal.ENDED),
        (timedelta(hours=-1), False, Refusal.ENDED),
    ],
)
def test_outside_the_window_or_offline_is_refused(settings, pool, starts_in, online, reason):
    act = make_activity(settings, starts_in=starts_in, online=online)
    assert handle_claim(pool, settings, claim(act["slug"])).reason is reason


def test_bad_numbers_and_unknown_activities_are_refused_with_a_reason(settings, pool):
    act = make_activity(settings)
    bad = handle_claim(pool, settings, claim(act["slug"], "12345"))
    assert (bad.status, bad.reason) == ("refused", Refusal.BAD_PHONE)
    assert bad.reason.text == "please enter a correct mobile number"
    assert handle_claim(pool, settings, claim("no-such-activity")).reason is Refusal.UNKNOWN_ACTIVITY


def test_budget_spent_is_sold_out_and_an_empty_pool_refuses_without_side_effects(settings, pool):
    act = make_activity(settings, budget=2, codes=10)
    outcomes = [handle_claim(pool, settings, claim(act["slug"])).reason for _ in range(3)]
    assert outcomes == [None, None, Refusal.SOLD_OUT]
    assert Refusal.SOLD_OUT.text == "all packages are gone"

    dry = make_activity(settings, budget=10, codes=1)
    assert handle_claim(pool, settings, claim(dry["slug"])).status == "credited"
    empty = handle_claim(pool, settings, claim(dry["slug"]))
    assert empty.reason is Refusal.POOL_EMPTY
    report = verify_clean(settings)
    assert report["counts"]["codes_bound"] == 3
    with psycopg.connect(settings.database_url) as conn:
        taken = conn.execute("SELECT count(*) FROM package_slots WHERE taken").fetchone()
    assert taken == (3,), "a refused claim must give its package slot back"


def test_new_user_templates_only_for_first_claims_on_the_platform(settings, pool):
    first = make_activity(settings, templates=2, new_user_template=True)
    second = make_activity(settings, templates=2, new_user_template=True)
    newcomer = handle_claim(pool, settings, claim(first["slug"], "+8613800138000"))
    assert len(newcomer.codes) == 2
    returning = handle_claim(pool, settings, claim(second["slug"], "+8613800138000"))
    assert len(returning.codes) == 1
    verify_clean(settings)
