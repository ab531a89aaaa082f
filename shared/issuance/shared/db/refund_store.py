"""The SQL of refunds: an order's coupons returned or voided (with the
checkout reservations that hold them), referrals reversed, rebates counted
against standing referrals and taken back.

Functions take an open psycopg connection inside the caller's transaction
and never commit. The rules are in :mod:`issuance.shared.domain.refunds`;
the asynchronous ``order-status-changed`` path and the synchronous checkout
API both dispose of an order's coupons through :func:`settle_coupons`.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime

from issuance.shared.db import promo_store
from issuance.shared.db.store import Conn
from issuance.shared.domain.refunds import CouponFate, RebateReversal
from psycopg.rows import class_row

# Given back: unused again, or expired when their time is up (the rule of
# issuance.shared.domain.refunds.returned_coupon_status, in SQL for the batch).
RETURN_COUPONS = """
UPDATE codes
   SET status = CASE WHEN expires_at <= %(at)s THEN 'expired' ELSE 'unused' END,
       order_id = NULL, used_at = NULL, discount_cents = NULL
 WHERE order_id = %(order_id)s AND status = 'used'
"""
# Voided: final; the code keeps the order and the discount it gave.
VOID_COUPONS = """
UPDATE codes SET status = 'voided', voided_at = %(at)s
 WHERE order_id = %(order_id)s AND status = 'used'
"""
# A reservation still waiting for payment ends with its order; a redemption
# given back is released too, so the code may be reserved again (never one
# whose code an earlier refund voided: that one stays spent).
RELEASE_RESERVATIONS = """
UPDATE checkout_reservations r
   SET state = 'released', released_at = %(at)s, release_reason = %(reason)s, redeemed_at = NULL
 WHERE r.order_id = %(order_id)s AND r.state = ANY(%(states)s)
   AND NOT EXISTS (SELECT 1 FROM codes c WHERE c.code = r.code AND c.status = 'voided')
"""


def settle_coupons(conn: Conn, order_id: str, fate: CouponFate, *, at: datetime, reason: str) -> int:
    """Return or void the coupons ``order_id`` used, and end its checkout
    reservations accordingly (``reason`` is the release reason kept). Runs
    again as a no-op: only coupons still used by the order move. Returns how
    many coupons moved."""
    params = {"order_id": order_id, "at": at, "reason": reason}
    if fate is CouponFate.RETURN:
        moved = conn.execute(RETURN_COUPONS, params).rowcount
        conn.execute(RELEASE_RESERVATIONS, {**params, "states": ["reserved", "redeemed"]})
        # A shared promo code's use is given back under its cap.
        moved += promo_store.release_order(conn, order_id, at, reason, states=("reserved", "redeemed"))
    else:
        moved = conn.execute(VOID_COUPONS, params).rowcount
        # A voided code stays redeemed by its order: it is spent for good.
        conn.execute(RELEASE_RESERVATIONS, {**params, "states": ["reserved"]})
        # So does a promo code's use (still counted under its cap).
        moved += promo_store.void_order(conn, order_id, at)
        promo_store.release_order(conn, order_id, at, reason)
    return moved


def move_order(conn: Conn, order_id: str, status: str, at: datetime, *, refunded_by: str | None) -> None:
    """Record an order's new status with its time (and, for a refund, who made it)."""
    sql = {
        "paid": "UPDATE orders SET status = 'paid', paid_at = %(at)s WHERE order_id = %(id)s",
        "fulfilled": "UPDATE orders SET status = 'fulfilled', fulfilled_at = %(at)s WHERE order_id = %(id)s",
        "cancelled": "UPDATE orders SET status = 'cancelled', cancelled_at = %(at)s WHERE order_id = %(id)s",
        "refunded": """UPDATE orders SET status = 'refunded', refunded_at = %(at)s, refunded_by = %(by)s
                        WHERE order_id = %(id)s""",
    }[status]
    conn.execute(sql, {"at": at, "id": order_id, "by": refunded_by or "buyer"})


# --- referrals -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ReferralKey:
    referrer_member_id: int
    activity_id: int


REVERSE_REFERRAL = """
UPDATE referrals SET reversed_at = %s
 WHERE order_id = %s AND reversed_at IS NULL
RETURNING referrer_member_id, activity_id
"""


def reverse_referral(conn: Conn, order_id: str, at: datetime) -> ReferralKey | None:
    """Reverse the referral the order counted for (its referee's refund);
    None when it counted for none, or was reversed already."""
    row = conn.cursor(row_factory=class_row(ReferralKey)).execute(REVERSE_REFERRAL, (at, order_id)).fetchone()
    return row


SHARE_OF_ORDER = """
SELECT s.referrer_member_id, s.activity_id FROM shares s
 WHERE s.order_id = %s AND s.activity_id IS NOT NULL
   AND (EXISTS (SELECT 1 FROM referrals r WHERE r.share_id = s.share_id)
        OR EXISTS (SELECT 1 FROM cell_referrals r WHERE r.share_id = s.share_id))
"""


def referrals_through_order(conn: Conn, order_id: str) -> ReferralKey | None:
    """The referrer and activity whose referrals came through the share made
    from ``order_id`` (the referrer's own order), if any came."""
    return conn.cursor(row_factory=class_row(ReferralKey)).execute(SHARE_OF_ORDER, (order_id,)).fetchone()


# Referrals that earn rebates: not reversed, the referee's order paid and
# not refunded, through a share whose own order (the referrer's) is too. With
# cells, the referrals counted in other cells (the referees') too: those are
# reversed there when the referee's order is refunded or cancelled.
EARNING_REFERRALS = """
SELECT (SELECT count(*) FROM referrals r
          JOIN orders e ON e.order_id = r.order_id
          JOIN shares s ON s.share_id = r.share_id
          JOIN orders o ON o.order_id = s.order_id
         WHERE r.referrer_member_id = %(referrer)s AND r.activity_id = %(activity_id)s
           AND r.reversed_at IS NULL
           AND e.status IN ('paid', 'fulfilled') AND o.status IN ('paid', 'fulfilled'))
     + (SELECT count(*) FROM cell_referrals r
          JOIN shares s ON s.share_id = r.share_id
          JOIN orders o ON o.order_id = s.order_id
         WHERE r.referrer_member_id = %(referrer)s AND r.activity_id = %(activity_id)s
           AND r.reversed_at IS NULL AND o.status IN ('paid', 'fulfilled'))
"""


def earning_referrals(conn: Conn, referrer: int, activity_id: int) -> int:
    row = conn.execute(EARNING_REFERRALS, {"referrer": referrer, "activity_id": activity_id}).fetchone()
    return int(row[0]) if row else 0


QUALIFYING_PAID_ORDERS = """
SELECT count(*) FROM orders
 WHERE member_id = %s AND order_id <> %s AND paid_at IS NOT NULL AND amount_cents >= %s
"""


def other_qualifying_orders(conn: Conn, member_id: int, order_id: str, min_amount_cents: int) -> int:
    """The member's other paid orders of at least the referral minimum:
    only the first of those can count as a referral."""
    row = conn.execute(QUALIFYING_PAID_ORDERS, (member_id, order_id, min_amount_cents)).fetchone()
    return int(row[0]) if row else 0


# --- rebates -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StandingRebate:
    rebate_id: int
    rebate_no: int
    amount_cents: int | None
    code: str | None
    code_status: str | None


STANDING_REBATES = """
SELECT b.rebate_id, b.rebate_no, b.amount_cents, c.code, c.status AS code_status
  FROM rebates b LEFT JOIN codes c ON c.rebate_id = b.rebate_id
 WHERE b.referrer_member_id = %s AND b.activity_id = %s AND b.reversed_at IS NULL
 ORDER BY b.rebate_no
   FOR UPDATE OF b
"""


def standing_rebates(conn: Conn, referrer: int, activity_id: int) -> list[StandingRebate]:
    """The referrer's rebates in the activity not taken back, oldest first, locked."""
    cursor = conn.cursor(row_factory=class_row(StandingRebate))
    return cursor.execute(STANDING_REBATES, (referrer, activity_id)).fetchall()


VOID_REBATE_CODE = """
UPDATE codes SET status = 'voided', voided_at = %s WHERE code = %s AND status = 'unused'
"""
REVERSE_REBATE = (
    "UPDATE rebates SET reversed_at = %s, reversal = %s WHERE rebate_id = %s AND reversed_at IS NULL"
)


def reverse_rebate(conn: Conn, rebate: StandingRebate, reversal: RebateReversal, at: datetime) -> None:
    """Take a rebate back: clawed back (its unused coupon voided), or
    flagged for an operator's review."""
    if reversal is RebateReversal.CLAWED_BACK and rebate.code is not None:
        conn.execute(VOID_REBATE_CODE, (at, rebate.code))
    conn.execute(REVERSE_REBATE, (at, reversal.value, rebate.rebate_id))
