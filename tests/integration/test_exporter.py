"""The exporter's figures, read from real PostgreSQL, against what was written;
the promise seen from a later ``now`` (the controllable clock)."""

from __future__ import annotations

import math
from datetime import timedelta

import psycopg
from issuance.shared.wire.messages import utcnow
from issuance.workers.exporter import Exporter, registry_for
from issuance.workers.handlers import handle_claim, handle_credit
from issuance.workers.sweeper import credit_messages

from tests.conftest import claim, make_activity


def samples(exporter: Exporter) -> dict[tuple[str, tuple[str, ...]], float]:
    registry = registry_for(exporter)
    return {
        (s.name, tuple(s.labels[k] for k in sorted(s.labels))): s.value
        for family in registry.collect()
        for s in family.samples
    }


def use_code(conn: psycopg.Connection[object], code: str, order: str, status: str, amount: int) -> None:
    paid = "now()" if status in ("paid", "refunded") else "NULL"
    refunded = "now()" if status == "refunded" else "NULL"
    conn.execute(
        "INSERT INTO orders (order_id, member_id, amount_cents, discount_cents, status, placed_at, paid_at,"
        f" refunded_at) SELECT %s, member_id, %s, 500, %s, now(), {paid}, {refunded}"
        " FROM codes WHERE code = %s",
        (order, amount, status, code),
    )
    use = "UPDATE codes SET status = 'used', order_id = %s, used_at = now(), discount_cents = 500"
    conn.execute(use + " WHERE code = %s", (order, code))


def test_an_exporter_of_a_cell_labels_every_sample_with_it(settings, two_step, pool):
    import dataclasses

    slug = make_activity(settings, budget=10, codes=20)["slug"]
    handle_claim(pool, two_step, claim(slug))
    plain, of_cell = Exporter(settings), Exporter(dataclasses.replace(settings, cell="b"))
    for exporter in (plain, of_cell):
        exporter.refresh()
    labelled = [s for family in registry_for(of_cell).collect() for s in family.samples]
    unlabelled = [s for family in registry_for(plain).collect() for s in family.samples]
    # Before: no cell label, the cells' series of one activity were told apart by instance only.
    assert labelled and all(s.labels.get("cell") == "b" for s in labelled)
    assert all("cell" not in s.labels for s in unlabelled)
    assert [s.value for s in labelled if s.name == "issuance_activity_packages_budget"] == [10]


def test_campaign_and_promise_figures(settings, two_step, pool):
    act = make_activity(settings, budget=10, codes=20)
    slug, prefix = act["slug"], act["prefixes"][0]
    outcomes = [handle_claim(pool, two_step, claim(slug)) for _ in range(4)]
    for message in credit_messages([o.claim_id for o in outcomes[:2]]):
        handle_credit(pool, message)
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        use_code(conn, outcomes[0].codes[0], "SO-PAID", "paid", 10_000)
        use_code(conn, outcomes[1].codes[0], "SO-REFUNDED", "refunded", 7_000)
        # One credit waits for its member to register: not under the promise yet.
        conn.execute(
            "INSERT INTO held_credits (claim_id, member_id) SELECT claim_id, member_id FROM claims"
            " WHERE claim_id = %s",
            (outcomes[3].claim_id,),
        )

    exporter = Exporter(settings)
    first = exporter.refresh()
    assert first is not None
    before = samples(exporter)
    assert before[("issuance_promise_credit_rate", ())] == 2 / 900, "two credits in the last 15 minutes"
    assert math.isnan(before[("issuance_activity_claim_rate", (slug,))]), "unknown after one reading"
    handle_claim(pool, two_step, claim(slug))
    # A day minus half an hour later, the two uncredited claims not held are at risk.
    later = utcnow() + timedelta(hours=23.5)
    exporter.refresh(later)
    after = samples(exporter)

    assert after[("issuance_activity_packages_budget", (slug,))] == 10
    assert after[("issuance_activity_packages_remaining", (slug,))] == 5
    assert after[("issuance_activity_claims", (slug, "credited"))] == 2
    assert after[("issuance_activity_claims", (slug, "bound"))] == 3
    assert after[("issuance_activity_collect_ratio", (slug,))] == 0.5
    assert after[("issuance_activity_usage_ratio", (slug,))] == 2 / 5
    assert after[("issuance_activity_coupon_orders", (slug,))] == 1, "the refunded order is no sale"
    assert after[("issuance_activity_discount_cents", (slug,))] == 500
    assert after[("issuance_activity_coupon_sales_cents", (slug,))] == 10_000
    assert after[("issuance_activity_cost_effectiveness_ratio", (slug,))] == 20
    assert after[("issuance_template_codes_generated", (slug, prefix))] == 20
    assert after[("issuance_template_codes_available", (slug, prefix))] == 15
    assert after[("issuance_template_codes_used", (slug, prefix))] == 2
    assert after[("issuance_activity_claim_rate", (slug,))] > 0
    forecast = after[("issuance_template_exhaustion_forecast_seconds", (slug, prefix))]
    assert 0 < forecast < math.inf

    assert after[("issuance_promise_uncredited_claims", ())] == 2
    assert after[("issuance_promise_held_claims", ())] == 1
    assert after[("issuance_promise_claims_at_risk", ("1h",))] == 2
    assert after[("issuance_promise_claims_overdue", ())] == 0
    assert 0 < after[("issuance_promise_headroom_seconds", ())] <= 1800
    assert after[("issuance_promise_oldest_uncredited_age_seconds", ())] >= 23.5 * 3600
    assert after[("issuance_promise_credit_rate", ())] == 0
    assert after[("issuance_promise_drain_forecast_seconds", ())] == math.inf
    assert after[("issuance_exporter_last_success_timestamp_seconds", ())] > 0
    assert after[("issuance_exporter_refresh_errors_total", ("postgres",))] == 0
