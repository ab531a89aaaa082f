"""The SQL of coupons after issuance, orders, referral rebates and held
credits: readable, named, one function per statement or step.

Functions take an open psycopg connection inside the caller's transaction
and never commit. The rules themselves are in issuance.shared.domain.coupons; refunds (coupons
returned or voided, referrals reversed, rebates taken back) are in
issuance.shared.db.refund_store.
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import datetime, timedelta

from issuance.shared.db.store import Conn
from issuance.shared.domain.coupons import CouponView
from psycopg.rows import class_row


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class OrderRow:
    order_id: str
    member_id: int
    amount_cents: int
    status: str
    placed_at: datetime


def record_refusal(conn: Conn, *, event_key: str, subject: str, reason: str, detail: str = "") -> bool:
    """Keep an illegal transition with its reason, once per (event, subject, reason)."""
    sql = """
    INSERT INTO lifecycle_refusals (event_key, subject, reason, detail) VALUES (%s, %s, %s, %s)
    ON CONFLICT (event_key, subject, reason) DO NOTHING
    """
    return conn.execute(sql, (event_key[:120], subject[:80], reason, detail[:2000])).rowcount == 1


# --- orders ----------------------------------------------------------------

INSERT_ORDER = """
INSERT INTO orders (order_id, member_id, activity_id, amount_cents, placed_at)
VALUES (%s, %s, (SELECT activity_id FROM activities WHERE slug = %s), %s, %s)
ON CONFLICT (order_id) DO NOTHING
RETURNING order_id
"""


def insert_order(
    conn: Conn, *, order_id: str, member_id: int, activity: str | None, amount_cents: int, placed_at: datetime
) -> bool:
    """Record a placed order; False when it is already recorded."""
    row = conn.execute(INSERT_ORDER, (order_id, member_id, activity, amount_cents, placed_at)).fetchone()
    return row is not None


def order_by_id(conn: Conn, order_id: str, *, lock: bool = False) -> OrderRow | None:
    sql = "SELECT order_id, member_id, amount_cents, status, placed_at FROM orders WHERE order_id = %s"
    cursor = conn.cursor(row_factory=class_row(OrderRow))
    return cursor.execute(sql + (" FOR UPDATE" if lock else ""), (order_id,)).fetchone()


def set_order_discount(conn: Conn, order_id: str, discount_cents: int) -> None:
    conn.execute("UPDATE orders SET discount_cents = %s WHERE order_id = %s", (discount_cents, order_id))


# --- coupons -----------------------------------------------------------------

COUPON_FOR_USE = """
SELECT c.code, c.status, c.member_id, c.order_id, c.expires_at,
       c.rebate_id IS NOT NULL OR EXISTS (
           SELECT 1 FROM wallet_ledger w WHERE (w.claim_id, w.code) = (c.claim_id, c.code)) AS credited,
       t.kind, t.value, t.threshold_cents
  FROM codes c JOIN coupon_templates t USING (template_id)
 WHERE c.code = %s
   FOR UPDATE OF c
"""


def coupon_for_use(conn: Conn, code: str) -> CouponView | None:
    """A code and what redeeming it depends on, locked for the transition."""
    return conn.cursor(row_factory=class_row(CouponView)).execute(COUPON_FOR_USE, (code,)).fetchone()


USE_COUPON = """
UPDATE codes SET status = 'used', order_id = %(order_id)s, used_at = %(at)s, discount_cents = %(discount)s
 WHERE code = %(code)s AND status = 'unused'
"""


def use_coupon(conn: Conn, *, code: str, order_id: str, at: datetime, discount_cents: int) -> bool:
    params = {"code": code, "order_id": order_id, "at": at, "discount": discount_cents}
    return conn.execute(USE_COUPON, params).rowcount == 1


EXPIRE_DUE = """
WITH due AS (
    SELECT code FROM codes
     WHERE status = 'unused' AND expires_at <= %s
     LIMIT %s
       FOR UPDATE SKIP LOCKED
)
UPDATE codes c SET status = 'expired' FROM due WHERE c.code = due.code
"""


def expire_due(conn: Conn, now: datetime, limit: int) -> int:
    """Mark up to ``limit`` unused coupons past their expiry as expired."""
    return conn.execute(EXPIRE_DUE, (now, limit)).rowcount


def lock_code_status(conn: Conn, code: str) -> str | None:
    row = conn.execute("SELECT status FROM codes WHERE code = %s FOR UPDATE", (code,)).fetchone()
    return None if row is None else str(row[0])


def cancel_code(conn: Conn, code: str, at: datetime) -> None:
    conn.execute("UPDATE codes SET status = 'cancelled', cancelled_at = %s WHERE code = %s", (at, code))


# --- referrals and rebates -------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ReferralSource:
    claim_id: uuid.UUID
    share_id: uuid.UUID
    activity_id: int
    referrer_member_id: int
    requested_at: datetime
    referrer_digest: bytes | None
    referee_digest: bytes | None


REFERRAL_SOURCE = """
SELECT k.claim_id, k.share_id, k.activity_id, s.referrer_member_id, k.requested_at,
       (SELECT phone_digest FROM members WHERE member_id = s.referrer_member_id) AS referrer_digest,
       (SELECT phone_digest FROM members WHERE member_id = k.member_id) AS referee_digest
  FROM claims k JOIN shares s USING (share_id)
 WHERE k.member_id = %s AND k.new_member AND k.status <> 'refused'
 ORDER BY k.requested_at
 LIMIT 1
"""


def referral_source(conn: Conn, member_id: int) -> ReferralSource | None:
    """The share a new member first claimed through, if any."""
    return (
        conn.cursor(row_factory=class_row(ReferralSource)).execute(REFERRAL_SOURCE, (member_id,)).fetchone()
    )


# Rebates of one referrer are counted one transaction at a time, so that two
# referrals committing together cannot both miss the K-th one.
REFERRER_LOCK_SPACE = 0x5EF


def lock_referrer(conn: Conn, referrer_member_id: int) -> None:
    conn.execute(
        "SELECT pg_advisory_xact_lock(%s, %s)", (REFERRER_LOCK_SPACE, referrer_member_id % (2**31 - 1))
    )


INSERT_REFERRAL = """
INSERT INTO referrals (referee_member_id, referrer_member_id, activity_id, share_id, claim_id, order_id)
VALUES (%s, %s, %s, %s, %s, %s)
ON CONFLICT DO NOTHING
"""


def insert_referral(conn: Conn, *, referee: int, source: ReferralSource, order_id: str) -> bool:
    """Count one successful referral; False when this referee already counted."""
    params = (
        referee,
        source.referrer_member_id,
        source.activity_id,
        source.share_id,
        source.claim_id,
        order_id,
    )
    return conn.execute(INSERT_REFERRAL, params).rowcount == 1


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RebateTerms:
    every: int
    amount_cents: int | None
    template_id: int | None
    # Where a rebate coupon's expiry comes from: the template's own activity.
    timezone: str
    validity_days: int | None
    valid_until: datetime | None


REBATE_TERMS = """
SELECT a.rebate_every AS every, a.rebate_amount_cents AS amount_cents, a.rebate_template_id AS template_id,
       coalesce(r.timezone, a.timezone) AS timezone, r.validity_days, r.valid_until
  FROM activities a
  LEFT JOIN coupon_templates t ON t.template_id = a.rebate_template_id
  LEFT JOIN activities r ON r.activity_id = t.activity_id
 WHERE a.activity_id = %s
"""


def rebate_terms(conn: Conn, activity_id: int) -> RebateTerms:
    terms = conn.cursor(row_factory=class_row(RebateTerms)).execute(REBATE_TERMS, (activity_id,)).fetchone()
    assert terms is not None, "a referral's activity exists"
    return terms


INSERT_REBATE = """
INSERT INTO rebates (referrer_member_id, activity_id, rebate_no, amount_cents, template_id, credited_at)
VALUES (%(referrer)s, %(activity_id)s, %(rebate_no)s, %(amount)s, %(template)s,
        CASE WHEN %(amount)s::bigint IS NULL THEN NULL ELSE %(now)s::timestamptz END)
ON CONFLICT (referrer_member_id, activity_id, rebate_no) WHERE reversed_at IS NULL DO NOTHING
RETURNING rebate_id
"""


def insert_rebate(
    conn: Conn, *, referrer: int, activity_id: int, rebate_no: int, terms: RebateTerms, now: datetime
) -> int | None:
    """Write the n-th standing rebate once; an amount is credited by this very row."""
    params = {
        "referrer": referrer,
        "activity_id": activity_id,
        "rebate_no": rebate_no,
        "amount": terms.amount_cents,
        "template": None if terms.amount_cents is not None else terms.template_id,
        "now": now,
    }
    row = conn.execute(INSERT_REBATE, params).fetchone()
    return None if row is None else int(row[0])


BIND_REBATE_CODE = """
WITH bound AS (
    UPDATE codes SET status = 'unused', member_id = %(member)s, rebate_id = %(rebate_id)s,
           bound_at = %(now)s, expires_at = %(expires_at)s
     WHERE code = (SELECT code FROM codes
                    WHERE template_id = %(template)s AND status = 'available'
                    LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING code
)
UPDATE rebates r SET code = bound.code, credited_at = %(now)s FROM bound
 WHERE r.rebate_id = %(rebate_id)s
RETURNING r.code
"""


def bind_rebate_code(
    conn: Conn, *, rebate_id: int, member: int, template: int, now: datetime, expires_at: datetime
) -> str | None:
    """Credit a coupon rebate: bind one code of the template to the referrer.
    None when the template's pool is empty (the rebate stays owed)."""
    params = {
        "rebate_id": rebate_id,
        "member": member,
        "template": template,
        "now": now,
        "expires_at": expires_at,
    }
    row = conn.execute(BIND_REBATE_CODE, params).fetchone()
    return None if row is None else str(row[0])


# --- held credits ------------------------------------------------------------------

HOLD_CREDITS = """
WITH held AS (
    SELECT k.claim_id, k.member_id
      FROM claims k
      JOIN activities a ON a.activity_id = k.activity_id
      JOIN members m ON m.member_id = k.member_id
     WHERE k.claim_id = ANY(%s) AND k.status = 'bound'
       AND a.hold_until_registered AND m.status = 'pending'
       FOR UPDATE OF m
)
INSERT INTO held_credits (claim_id, member_id)
SELECT claim_id, member_id FROM held
ON CONFLICT (claim_id) DO UPDATE SET member_id = EXCLUDED.member_id  -- a no-op that still returns the row
RETURNING claim_id
"""


def hold_credits(conn: Conn, claim_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Hold the claims whose activity waits for registration and whose member
    is still pending; return them (the rest may be credited now)."""
    return {r[0] for r in conn.execute(HOLD_CREDITS, (claim_ids,)).fetchall()}


REGISTER_BY_PHONE = """
INSERT INTO members (phone_digest, phone_masked, phone_key_id, status, registered_at)
VALUES (%s, %s, %s, 'registered', %s)
ON CONFLICT (phone_digest) DO UPDATE
   SET status = 'registered', registered_at = coalesce(members.registered_at, EXCLUDED.registered_at)
RETURNING member_id, registered_at
"""
REGISTER_BY_ID = """
UPDATE members SET status = 'registered', registered_at = coalesce(registered_at, %s)
 WHERE member_id = %s
RETURNING member_id, registered_at
"""


def register_member(
    conn: Conn,
    *,
    registered_at: datetime,
    member_id: int | None = None,
    digest_masked: tuple[bytes, str, str] | None = None,
) -> tuple[int, datetime] | None:
    """Mark a member registered (creating it for an unknown number); None for
    an unknown member ID. Returns (member_id, first registration time).
    ``digest_masked``: the number's digest, masked form and phone key ID."""
    if digest_masked is not None:
        row = conn.execute(REGISTER_BY_PHONE, (*digest_masked, registered_at)).fetchone()
    else:
        row = conn.execute(REGISTER_BY_ID, (registered_at, member_id)).fetchone()
    return None if row is None else (int(row[0]), row[1])


RELEASE_HELD = """
WITH released AS (
    UPDATE held_credits SET released_at = %(now)s
     WHERE member_id = %(member)s AND released_at IS NULL
    RETURNING claim_id
)
UPDATE claims k SET deadline = %(deadline)s
  FROM released WHERE k.claim_id = released.claim_id AND k.status = 'bound'
"""
RELEASED_UNCREDITED = """
SELECT h.claim_id FROM held_credits h JOIN claims k USING (claim_id)
 WHERE h.member_id = %s AND h.released_at IS NOT NULL AND k.status = 'bound'
 ORDER BY h.claim_id
"""


def release_held(
    conn: Conn, *, member_id: int, registered_at: datetime, promise_seconds: int, now: datetime
) -> list[uuid.UUID]:
    """Release a member's held credits: the promise now runs from
    registration. Returns every released claim not credited yet (also those
    released by an earlier delivery that died before sending them on)."""
    deadline = registered_at + timedelta(seconds=promise_seconds)
    conn.execute(RELEASE_HELD, {"now": now, "member": member_id, "deadline": deadline})
    return [r[0] for r in conn.execute(RELEASED_UNCREDITED, (member_id,)).fetchall()]


PROMISE_STARTS = """
SELECT h.claim_id, m.registered_at
  FROM held_credits h JOIN members m USING (member_id)
 WHERE h.claim_id = ANY(%s) AND h.released_at IS NOT NULL AND m.registered_at IS NOT NULL
"""


def promise_starts(conn: Conn, claim_ids: list[uuid.UUID]) -> dict[uuid.UUID, datetime]:
    """For claims released from a hold: their promise runs from registration."""
    return {r[0]: r[1] for r in conn.execute(PROMISE_STARTS, (claim_ids,)).fetchall()}
