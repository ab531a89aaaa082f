"""Many claims in one transaction decide exactly as one at a time would."""

from __future__ import annotations

import uuid
from collections import Counter

from issuance.shared.domain import Refusal
from issuance.shared.wire.messages import ClaimsRequested, CreditRequested
from issuance.workers.handlers import handle_claims, handle_credit

from tests.conftest import claim, make_activity, verify_clean


def test_a_batch_applies_every_rule_within_itself(settings, two_step, pool):
    act = make_activity(settings, budget=5, codes=10, templates=2)
    other = make_activity(settings, group="g1")
    similar = make_activity(settings, group="g1")
    first = claim(act["slug"], "+8613800138000")
    batch = [
        first,
        first,  # the same claim twice in one batch
        claim(act["slug"], "+8613800138000"),  # same number, new claim ID
        claim(act["slug"], "12345"),
        claim("no-such-activity"),
        claim(other["slug"], "+8613900139000"),
        claim(similar["slug"], "+8613900139000"),  # same group, same batch
        *[claim(act["slug"]) for _ in range(6)],  # only 4 packages left
        claim(act["slug"], "+8613700137000", claim_id=first.claim_id),  # same ID, other payload
    ]
    outcomes = handle_claims(pool, two_step, batch)
    assert len(outcomes) == len(batch)
    assert [o.claim_id for o in outcomes] == [m.claim_id for m in batch]
    assert (outcomes[0].status, outcomes[0].duplicate) == ("bound", False)
    assert (outcomes[1].status, outcomes[1].duplicate) == ("bound", True)
    assert outcomes[2].reason is Refusal.ALREADY_RECEIVED
    assert outcomes[3].reason is Refusal.BAD_PHONE
    assert outcomes[4].reason is Refusal.UNKNOWN_ACTIVITY
    assert outcomes[5].status == "bound" and outcomes[6].reason is Refusal.SIMILAR_ACTIVITY
    assert Counter(o.reason for o in outcomes[7:13]) == {None: 4, Refusal.SOLD_OUT: 2}
    assert outcomes[13].status == "conflict"

    bound = tuple(o.claim_id for o in outcomes if o.status == "bound" and not o.duplicate)
    assert len(handle_credit(pool, CreditRequested(claim_ids=bound))) == 6
    assert handle_credit(pool, CreditRequested(claim_ids=bound)) == []
    report = verify_clean(settings)
    assert report["counts"]["credits"] == 5 * 2 + 1

    # Delivered again, the whole batch changes nothing.
    again = handle_claims(pool, two_step, batch)
    assert all(o.duplicate for o in again)
    assert verify_clean(settings)["counts"] == report["counts"]


def test_the_batch_message_round_trips_and_caps_its_size(settings):
    claims = tuple(claim("spring") for _ in range(3))
    message = ClaimsRequested(batch_id=uuid.uuid4(), claims=claims)
    import orjson

    decoded = ClaimsRequested.from_payload(orjson.loads(orjson.dumps(message.to_payload())))
    assert decoded == message
    import pytest
    from issuance.shared.errors import InvalidMessage

    with pytest.raises(InvalidMessage, match="1 to 1000"):
        ClaimsRequested.from_payload({"v": 1, "batch_id": str(uuid.uuid4()), "claims": []})
    # One bad item does not sink the batch: it is set aside with its reason.
    bad = orjson.loads(orjson.dumps({**message.to_payload(), "claims": [{"v": 1}, claims[0].to_payload()]}))
    mixed = ClaimsRequested.from_payload(bad)
    assert mixed.valid == claims[:1]
    (rejected,) = mixed.rejected
    assert (rejected.index, rejected.error.reason, rejected.payload) == (0, "missing_field", {"v": 1})


def test_rows_left_behind_the_allocation_mark_are_still_handed_out(settings, pool):
    """Allocation starts where the last one in this process stopped; codes and
    slots it passed over (held by a transaction that rolled back) must still
    be found before the pool is called empty or the activity sold out."""
    from issuance.shared.db import store

    act = make_activity(settings, budget=6, codes=6)
    with pool.connection() as conn:
        (activity_id, template_id) = conn.execute(
            "SELECT a.activity_id, t.template_id FROM activities a"
            " JOIN coupon_templates t USING (activity_id) WHERE a.slug = %s",
            (act["slug"],),
        ).fetchone()
        with conn.transaction(force_rollback=True):
            assert len(store.lock_free_codes(conn, template_id, 3)) == 3
            assert len(store.lock_free_slots(conn, activity_id, 3)) == 3
    outcomes = handle_claims(pool, settings, [claim(act["slug"]) for _ in range(7)])
    assert Counter(o.status for o in outcomes) == {"credited": 6, "refused": 1}
    assert [o.reason for o in outcomes if o.status == "refused"] == [Refusal.SOLD_OUT]
    with pool.connection() as conn:
        left = conn.execute(
            "SELECT count(*) FROM codes WHERE template_id = %s AND status = 'available'", (template_id,)
        )
        assert left.fetchone() == (0,)
    verify_clean(settings)


def test_statements_are_planned_for_their_parameters_whatever_the_statistics(settings, pool):
    """A lookup by claim ID, run many times while ``claims`` was empty, still
    uses the primary key once the table has grown (never analysed).

    The scans are read from ``pg_stat_xact_user_tables`` before and after the
    lookup, in one transaction: this backend's own counts, not yet flushed, so
    exact at once, with no wait for a flush and nothing from other
    connections. Autovacuum
    is off for ``claims`` meanwhile: an ANALYZE would replace a stale plan and
    hide the fault this test is for."""
    from issuance.shared.db import store

    scans = "SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables WHERE relname = 'claims'"
    with pool.connection() as conn:
        conn.execute("ALTER TABLE claims SET (autovacuum_enabled = false)")
        conn.commit()
        try:
            for _ in range(20):  # enough for a prepared statement and a generic plan
                store.claims_by_ids(conn, [uuid.uuid4()])
            conn.commit()
            act = make_activity(settings, budget=3000, codes=3000)
            handle_claims(pool, settings, [claim(act["slug"]) for _ in range(3000)])
            # One transaction: a backend flushes its counts only between transactions.
            seq_before, idx_before = conn.execute(scans).fetchone()
            store.claims_by_ids(conn, [uuid.uuid4()])
            seq_after, idx_after = conn.execute(scans).fetchone()
            conn.commit()
        finally:
            conn.rollback()
            conn.execute("ALTER TABLE claims RESET (autovacuum_enabled)")
            conn.commit()
    assert (seq_after - seq_before, idx_after - idx_before) == (0, 1), "the lookup scanned the whole table"
