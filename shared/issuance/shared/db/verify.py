"""``issuance verify``: reconcile the database against the invariants.

Each check is one named query returning the offending rows; a clean database
returns none. The schema already forbids most of these: the checks prove it
on real data, and catch what a constraint cannot (a deadline passing).
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

from issuance.shared.db.store import Conn
from issuance.shared.domain.claims import ClaimStatus

# Coupons after issuance, orders, referrals and rebates.
BACKOFFICE_CHECKS: dict[str, str] = {
    "codes_differ_from_batches": """
        SELECT b.batch_id, b.size,
               count(c.code) FILTER (WHERE c.status IN ('unused', 'used', 'expired', 'voided')),
               count(c.code) FILTER (WHERE c.status = 'available'),
               count(c.code) FILTER (WHERE c.status = 'cancelled')
          FROM code_batches b LEFT JOIN codes c USING (batch_id)
         GROUP BY b.batch_id HAVING count(c.code) <> b.size""",
    "used_coupon_without_order": """
        SELECT c.code FROM codes c LEFT JOIN orders o USING (order_id)
         WHERE c.status = 'used' AND (o.order_id IS NULL OR o.status = 'cancelled')""",
    "used_coupon_of_another_member": """
        SELECT c.code FROM codes c JOIN orders o USING (order_id) WHERE c.member_id <> o.member_id""",
    # An order's discount is its coupons' plus its redeemed promo uses'.
    "order_discount_differs_from_coupons": """
        WITH parts AS (
            SELECT order_id, discount_cents FROM codes WHERE order_id IS NOT NULL
            UNION ALL
            SELECT order_id, discount_cents FROM promo_uses WHERE state = 'redeemed')
        SELECT o.order_id FROM orders o JOIN parts p USING (order_id)
         WHERE o.status <> 'cancelled'
         GROUP BY o.order_id HAVING sum(p.discount_cents) <> max(o.discount_cents)""",
    # A promo code's counters are its live uses (reserved or redeemed).
    "promo_uses_differ_from_counter": """
        SELECT p.code FROM promo_codes p
          LEFT JOIN promo_uses u ON u.promo_id = p.promo_id AND u.state IN ('reserved', 'redeemed')
         GROUP BY p.promo_id, p.code HAVING count(u.use_id) <> max(p.uses)""",
    "rebate_twice_per_referee": """
        SELECT referee_member_id FROM referrals GROUP BY referee_member_id HAVING count(*) > 1""",
    "self_referral": """
        SELECT r.referee_member_id FROM referrals r
          LEFT JOIN members a ON a.member_id = r.referrer_member_id
          JOIN members b ON b.member_id = r.referee_member_id
         WHERE r.referrer_member_id = r.referee_member_id OR a.phone_digest = b.phone_digest""",
    "referral_without_paid_order": """
        SELECT r.referee_member_id FROM referrals r JOIN orders o USING (order_id) WHERE o.paid_at IS NULL""",
    "more_rebates_than_earned": """
        SELECT b.referrer_member_id, b.activity_id FROM rebates b
          JOIN activities a USING (activity_id)
         GROUP BY b.referrer_member_id, b.activity_id, a.rebate_every
        HAVING max(b.rebate_no) > ((SELECT count(*) FROM referrals r
                                     WHERE r.referrer_member_id = b.referrer_member_id
                                       AND r.activity_id = b.activity_id)
                                 + (SELECT count(*) FROM cell_referrals r
                                     WHERE r.referrer_member_id = b.referrer_member_id
                                       AND r.activity_id = b.activity_id)) / a.rebate_every""",
    "rebate_not_credited": """
        SELECT rebate_id FROM rebates WHERE credited_at IS NULL AND reversed_at IS NULL""",
}

# Refunds (issuance.shared.domain.refunds): what a cancellation or a refund
# must have undone, and what still stands on it.
REFUND_CHECKS: dict[str, str] = {
    "coupon_used_by_refunded_order": """
        SELECT c.code FROM codes c JOIN orders o USING (order_id)
         WHERE c.status = 'used' AND o.status = 'refunded'""",
    "referral_of_refunded_order": """
        SELECT r.referee_member_id FROM referrals r JOIN orders o USING (order_id)
         WHERE r.reversed_at IS NULL AND o.status IN ('cancelled', 'refunded')""",
    "rebate_not_earned": """
        SELECT b.referrer_member_id, b.activity_id FROM rebates b
          JOIN activities a USING (activity_id)
         WHERE b.reversed_at IS NULL
         GROUP BY b.referrer_member_id, b.activity_id, a.rebate_every
        HAVING count(*) > ((SELECT count(*) FROM referrals r
                             JOIN orders e ON e.order_id = r.order_id
                             JOIN shares s ON s.share_id = r.share_id
                             JOIN orders o ON o.order_id = s.order_id
                            WHERE r.referrer_member_id = b.referrer_member_id
                              AND r.activity_id = b.activity_id AND r.reversed_at IS NULL
                              AND e.status IN ('paid', 'fulfilled')
                              AND o.status IN ('paid', 'fulfilled'))
                         + (SELECT count(*) FROM cell_referrals r
                             JOIN shares s ON s.share_id = r.share_id
                             JOIN orders o ON o.order_id = s.order_id
                            WHERE r.referrer_member_id = b.referrer_member_id
                              AND r.activity_id = b.activity_id AND r.reversed_at IS NULL
                              AND o.status IN ('paid', 'fulfilled'))) / a.rebate_every""",
    "clawed_back_rebate_coupon_still_usable": """
        SELECT b.rebate_id FROM rebates b JOIN codes c USING (rebate_id)
         WHERE b.reversal = 'clawed_back' AND c.status = 'unused'""",
}

CHECKS: dict[str, str] = {
    "code_bound_to_refused_claim": """
        SELECT c.code FROM codes c JOIN claims k USING (claim_id) WHERE k.status = 'refused'""",
    "code_member_differs_from_claim": """
        SELECT c.code FROM codes c JOIN claims k USING (claim_id) WHERE c.member_id <> k.member_id""",
    "two_packages_per_activity_member": """
        SELECT activity_id, member_id FROM claims WHERE status <> 'refused'
         GROUP BY activity_id, member_id HAVING count(*) > 1""",
    "two_packages_per_group_member": """
        SELECT exclusivity_group, member_id FROM claims WHERE status <> 'refused'
         GROUP BY exclusivity_group, member_id HAVING count(*) > 1""",
    "credit_twice_per_claim_code": """
        SELECT claim_id, code FROM wallet_ledger GROUP BY claim_id, code HAVING count(*) > 1""",
    "over_budget": """
        SELECT a.slug FROM activities a
          JOIN claims k ON k.activity_id = a.activity_id AND k.status <> 'refused'
         GROUP BY a.activity_id HAVING count(*) > a.budget""",
    "slots_differ_from_budget": """
        SELECT a.slug FROM activities a LEFT JOIN package_slots s USING (activity_id)
         GROUP BY a.activity_id HAVING count(s.slot_no) <> a.budget""",
    "taken_slot_without_claim": """
        SELECT s.activity_id, s.slot_no FROM package_slots s
          LEFT JOIN claims k ON (k.activity_id, k.slot_no) = (s.activity_id, s.slot_no)
         WHERE s.taken AND k.claim_id IS NULL""",
    "granted_claim_without_codes": """
        SELECT k.claim_id FROM claims k
         WHERE k.status <> 'refused' AND NOT EXISTS (SELECT 1 FROM codes c WHERE c.claim_id = k.claim_id)""",
    "credited_claim_missing_entries": """
        SELECT c.claim_id, c.code FROM codes c JOIN claims k USING (claim_id)
         WHERE k.status = 'credited'
           AND NOT EXISTS (SELECT 1 FROM wallet_ledger w
                            WHERE (w.claim_id, w.code) = (c.claim_id, c.code))""",
    "credit_for_uncredited_claim": """
        SELECT w.claim_id FROM wallet_ledger w JOIN claims k USING (claim_id) WHERE k.status <> 'credited'""",
    "uncredited_past_deadline": """
        SELECT claim_id FROM claims k WHERE status = 'bound' AND deadline < now()
           AND NOT EXISTS (SELECT 1 FROM held_credits h
                            WHERE h.claim_id = k.claim_id AND h.released_at IS NULL)""",
    **BACKOFFICE_CHECKS,
    **REFUND_CHECKS,
}

# Checks that take the grace period, %(grace)s: a claim is given this long to
# move on before its absence from the next state is a breach.
GRACE_CHECKS: dict[str, str] = {
    "bound_uncredited_past_grace": """
        SELECT claim_id FROM claims k
         WHERE status = 'bound' AND decided_at < now() - %(grace)s
           AND NOT EXISTS (SELECT 1 FROM held_credits h
                            WHERE h.claim_id = k.claim_id AND h.released_at IS NULL)""",
}
DEFAULT_GRACE = timedelta(minutes=10)

COUNTS = """
SELECT
  (SELECT count(*) FROM claims),
  (SELECT count(*) FROM claims WHERE status = 'bound'),
  (SELECT count(*) FROM claims WHERE status = 'credited'),
  (SELECT count(*) FROM claims WHERE status = 'refused'),
  (SELECT count(*) FROM codes WHERE claim_id IS NOT NULL),
  (SELECT count(*) FROM codes WHERE status = 'available'),
  (SELECT count(*) FROM wallet_ledger),
  (SELECT count(*) FROM dead_letters)
"""
REFUSALS = "SELECT reason, count(*) FROM claims WHERE status = 'refused' GROUP BY reason ORDER BY reason"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    counts: dict[str, int]
    refusals: dict[str, int]
    breaches: dict[str, list[list[Any]]]

    @property
    def clean(self) -> bool:
        return not any(self.breaches.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "counts": self.counts,
            "refused_by_reason": self.refusals,
            "breaches": {name: len(rows) for name, rows in self.breaches.items()},
            "examples": {name: rows[:5] for name, rows in self.breaches.items() if rows},
        }


# The acceptance ledger's check (issuance.shared.db.ledger): claims accepted
# longer than the grace period ago with neither a row nor a dead letter.
LEDGER_CHECK = "accepted_unrecorded"


def with_ledger(report: Report, found: list[list[str]]) -> Report:
    """``report`` with the ledger's check: ``found`` is one row per claim
    accepted and not recorded (claim ID, ledger offset, accepted at)."""
    return dataclasses.replace(report, breaches={**report.breaches, LEDGER_CHECK: found})


def verify(conn: Conn, *, grace: timedelta = DEFAULT_GRACE) -> Report:
    """Run every check; ``grace`` is how long a claim may wait between states
    (settings.reconcile_grace_seconds) before its waiting is a breach."""
    names = (
        "claims",
        ClaimStatus.BOUND.value,
        ClaimStatus.CREDITED.value,
        ClaimStatus.REFUSED.value,
        "codes_bound",
        "codes_available",
        "credits",
        "dead_letters",
    )
    row = conn.execute(COUNTS).fetchone()
    assert row is not None
    counts = dict(zip(names, (int(v) for v in row), strict=True))
    refusals = {reason: int(n) for reason, n in conn.execute(REFUSALS).fetchall()}
    breaches = {
        name: [[str(v) for v in r] for r in conn.execute(sql).fetchmany(100)] for name, sql in CHECKS.items()
    }
    for name, sql in GRACE_CHECKS.items():
        breaches[name] = [[str(v) for v in r] for r in conn.execute(sql, {"grace": grace}).fetchmany(100)]
    return Report(counts=counts, refusals=refusals, breaches=breaches)
