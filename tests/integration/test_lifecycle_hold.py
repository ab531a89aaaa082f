"""Unregistered numbers: credited at once by default; held until the member
registers where the activity says so, the 24-hour promise then running from
registration."""

from __future__ import annotations

from datetime import timedelta

import psycopg
import pytest
from issuance.shared.errors import InvalidMessage
from issuance.shared.wire.messages import CreditRequested, MemberRegistered, utcnow
from issuance.workers.handlers import handle_claim, handle_credit
from issuance.workers.lifecycle import handle_member_registered, prepare_credit

from tests.conftest import claim, verify_clean
from tests.integration.lifecycle_support import activity_with, one, phone, refusals


def test_by_default_a_pending_member_is_credited_at_once(settings, pool):
    act = activity_with(settings)
    outcome = handle_claim(pool, settings, claim(act["slug"], phone()))
    assert prepare_credit(pool, [outcome.claim_id]).ready == [outcome.claim_id]
    assert one(settings, "SELECT status FROM members") == "pending"


def test_held_credits_wait_for_registration_and_the_promise_moves(settings, pool):
    held_act = activity_with(settings, hold_until_registered=True)
    plain_act = activity_with(settings)
    number = phone()
    held = handle_claim(pool, settings, claim(held_act["slug"], number))
    plain = handle_claim(pool, settings, claim(plain_act["slug"], phone()))
    ids = [held.claim_id, plain.claim_id]
    assert prepare_credit(pool, ids).ready == [plain.claim_id]
    assert prepare_credit(pool, ids).ready == [plain.claim_id], "a redelivery stays held"
    handle_credit(pool, CreditRequested(claim_ids=(plain.claim_id,)))
    assert one(settings, "SELECT status FROM claims WHERE claim_id = %s", held.claim_id) == "bound"
    # A held claim past its original deadline is not a broken promise.
    with psycopg.connect(settings.database_url) as conn:
        conn.execute(
            "UPDATE claims SET deadline = now() - interval '1 hour' WHERE claim_id = %s", (held.claim_id,)
        )
    verify_clean(settings)

    registered_at = utcnow() - timedelta(minutes=5)
    message = MemberRegistered(phone=number, registered_at=registered_at)
    assert handle_member_registered(pool, settings, message) == [held.claim_id]
    deadline = one(settings, "SELECT deadline FROM claims WHERE claim_id = %s", held.claim_id)
    assert deadline == registered_at + timedelta(seconds=settings.credit_promise_seconds)
    # Delivered again before the credit went through: the claim is sent on again.
    assert handle_member_registered(pool, settings, message) == [held.claim_id]
    plan = prepare_credit(pool, [held.claim_id, plain.claim_id])
    assert plan.ready == [held.claim_id, plain.claim_id]
    assert plan.promise_from == {held.claim_id: registered_at}, "latency is measured from registration"
    assert len(handle_credit(pool, CreditRequested(claim_ids=(held.claim_id,)))) == 1
    assert handle_member_registered(pool, settings, message) == []
    assert one(
        settings,
        "SELECT status, registered_at FROM members WHERE member_id = %s",
        held_member(settings, held),
    ) == (
        "registered",
        registered_at,
    )
    verify_clean(settings)


def held_member(settings, outcome):
    return one(settings, "SELECT member_id FROM claims WHERE claim_id = %s", outcome.claim_id)


def test_a_registered_member_is_not_held(settings, pool):
    act = activity_with(settings, hold_until_registered=True)
    number = phone()
    handle_member_registered(pool, settings, MemberRegistered(phone=number, registered_at=utcnow()))
    outcome = handle_claim(pool, settings, claim(act["slug"], number))
    assert prepare_credit(pool, [outcome.claim_id]).ready == [outcome.claim_id]


def test_unknown_member_ids_are_recorded_and_bad_numbers_dead_lettered(settings, pool):
    assert (
        handle_member_registered(pool, settings, MemberRegistered(member_id=424242, registered_at=utcnow()))
        == []
    )
    assert refusals(settings) == [("424242", "unknown_member")]
    with pytest.raises(InvalidMessage):
        handle_member_registered(pool, settings, MemberRegistered(phone="12345", registered_at=utcnow()))
    with pytest.raises(InvalidMessage):
        MemberRegistered.from_payload({"v": 1, "registered_at": "2026-11-12T09:30:00+08:00"})
