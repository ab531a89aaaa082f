"""The SQL of the checkout: a member's wallet as checkout sees it, and the
reservations that hold codes for orders (see
:mod:`issuance.shared.db.checkout_models`).

Functions take an open psycopg connection inside the caller's transaction
and never commit. The rules are in :mod:`issuance.shared.domain.checkout`;
using a code in an order is :func:`issuance.shared.db.coupon_store.use_coupon`,
the same statement the asynchronous ``order-placed`` path runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from issuance.shared.db.store import Conn
from issuance.shared.domain.checkout import CouponRules, WalletCoupon
from psycopg.rows import class_row, dict_row

# What checkout needs of a code: its rule (the template), its validity window
# (the start of the activity's fixed window; the code's own expiry), whether
# it reached the wallet, the order holding it (a live reservation, or the
# order it was used in by the asynchronous path), and, for a template with a
# per-person count, how many other coupons of the template the member has
# used or holds for an order (found through the member's orders, which are
# indexed by member; the codes asked about are not counted).
WALLET_COLUMNS = """
SELECT c.code, c.member_id, t.kind, t.value, t.threshold_cents, a.valid_from, c.expires_at, c.status,
       c.rebate_id IS NOT NULL OR EXISTS (
           SELECT 1 FROM wallet_ledger w WHERE (w.claim_id, w.code) = (c.claim_id, c.code)) AS credited,
       coalesce((SELECT r.order_id FROM checkout_reservations r
                  WHERE r.code = c.code AND r.state IN ('reserved', 'redeemed')), c.order_id) AS held_by,
       t.template_id, t.scope_products, t.scope_categories, t.scope_stores, t.min_items,
       t.min_member_level, t.stackable, t.priority, t.per_person_limit,
       CASE WHEN t.per_person_limit IS NULL THEN 0 ELSE (
           SELECT count(*) FROM (
               SELECT u.code FROM orders o JOIN codes u ON u.order_id = o.order_id
                WHERE o.member_id = c.member_id AND u.status = 'used'
               UNION
               SELECT r.code FROM orders o JOIN checkout_reservations r ON r.order_id = o.order_id
                WHERE o.member_id = c.member_id AND r.state = 'reserved'
           ) AS taken JOIN codes u ON u.code = taken.code
            WHERE u.template_id = t.template_id AND u.code <> ALL(%(codes)s::text[])
       ) END AS member_uses
  FROM codes c
  JOIN coupon_templates t USING (template_id)
  JOIN activities a ON a.activity_id = t.activity_id
"""

WALLET = WALLET_COLUMNS + " WHERE c.member_id = %(member)s AND c.status <> 'available' ORDER BY c.code"

RULE_COLUMNS = (
    "scope_products",
    "scope_categories",
    "scope_stores",
    "min_items",
    "min_member_level",
    "stackable",
    "priority",
    "per_person_limit",
)


def coupon_of(row: dict[str, Any]) -> WalletCoupon:
    """A row of WALLET_COLUMNS, by name, as checkout's rules see it."""
    values = {k: v for k, v in row.items() if k not in RULE_COLUMNS}
    rules = CouponRules(
        products=frozenset(row["scope_products"]),
        categories=frozenset(row["scope_categories"]),
        stores=frozenset(row["scope_stores"]),
        min_items=row["min_items"],
        min_member_level=row["min_member_level"],
        stackable=row["stackable"],
        priority=row["priority"],
        per_person_limit=row["per_person_limit"],
    )
    return WalletCoupon(**values, rules=rules)


def _coupons(conn: Conn, sql: str, params: dict[str, Any]) -> list[WalletCoupon]:
    return [coupon_of(row) for row in conn.cursor(row_factory=dict_row).execute(sql, params).fetchall()]


def wallet(conn: Conn, member_id: int) -> list[WalletCoupon]:
    """Every coupon bound to a member, whatever its state."""
    return _coupons(conn, WALLET, {"member": member_id, "codes": []})


# Locked in code order, so that two orders naming the same codes cannot
# deadlock; read again after the lock, so the read sees what the holder of
# the lock committed.
LOCK_CODES = "SELECT code FROM codes WHERE code = ANY(%s) ORDER BY code FOR UPDATE"
COUPONS = WALLET_COLUMNS + " WHERE c.code = ANY(%(codes)s) ORDER BY c.code"


def coupons_for_update(conn: Conn, codes: Sequence[str]) -> list[WalletCoupon]:
    """The named codes, locked for the caller's transaction (unknown codes
    are simply absent)."""
    wanted = sorted(set(codes))
    conn.execute(LOCK_CODES, (wanted,))
    return _coupons(conn, COUPONS, {"codes": wanted})


def coupons_named(conn: Conn, codes: Sequence[str]) -> list[WalletCoupon]:
    """The named codes, read without a lock (validation only)."""
    return _coupons(conn, COUPONS, {"codes": sorted(set(codes))})


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ReservationRow:
    order_id: str
    code: str
    member_id: int
    state: str
    amount_cents: int
    items: int
    discount_cents: int
    reserved_at: datetime
    hold_until: datetime
    redeemed_at: datetime | None
    released_at: datetime | None
    release_reason: str | None
    # A use of a shared promo code (issuance.shared.db.promo_store), not a code's reservation.
    promo: bool = False


RESERVATIONS = """
SELECT order_id, code, member_id, state, amount_cents, items, discount_cents,
       reserved_at, hold_until, redeemed_at, released_at, release_reason
  FROM checkout_reservations WHERE order_id = %s ORDER BY code
"""


def reservations_of(conn: Conn, order_id: str, *, lock: bool = False) -> list[ReservationRow]:
    """An order's reservations, in code order."""
    sql = RESERVATIONS + (" FOR UPDATE" if lock else "")
    return conn.cursor(row_factory=class_row(ReservationRow)).execute(sql, (order_id,)).fetchall()


# No conflict target: the order's own (order, code) pair and the live-code
# index both end in DO NOTHING, and the caller reads the row count.
INSERT_RESERVATION = """
INSERT INTO checkout_reservations
       (order_id, code, member_id, amount_cents, items, discount_cents, reserved_at, hold_until)
VALUES (%(order_id)s, %(code)s, %(member_id)s, %(amount)s, %(items)s, %(discount)s, %(at)s, %(hold_until)s)
ON CONFLICT DO NOTHING
"""


def insert_reservation(
    conn: Conn,
    *,
    order_id: str,
    code: str,
    member_id: int,
    amount_cents: int,
    items: int,
    discount_cents: int,
    at: datetime,
    hold_until: datetime,
) -> bool:
    """Hold ``code`` for ``order_id``; False when the code is already live in
    an order (the database decides, not the check before it)."""
    params = {
        "order_id": order_id,
        "code": code,
        "member_id": member_id,
        "amount": amount_cents,
        "items": items,
        "discount": discount_cents,
        "at": at,
        "hold_until": hold_until,
    }
    return conn.execute(INSERT_RESERVATION, params).rowcount == 1


MARK_REDEEMED = """
UPDATE checkout_reservations SET state = 'redeemed', redeemed_at = %s
 WHERE order_id = %s AND state = 'reserved'
"""


def mark_redeemed(conn: Conn, order_id: str, at: datetime) -> int:
    return conn.execute(MARK_REDEEMED, (at, order_id)).rowcount


RELEASE_ORDER = """
UPDATE checkout_reservations SET state = 'released', released_at = %s, release_reason = %s
 WHERE order_id = %s AND state = 'reserved'
"""


def release_order(conn: Conn, order_id: str, at: datetime, reason: str) -> int:
    """Release an order's reservations still waiting for payment."""
    return conn.execute(RELEASE_ORDER, (at, reason, order_id)).rowcount


RELEASE_TIMED_OUT = """
WITH due AS (
    SELECT reservation_id FROM checkout_reservations
     WHERE state = 'reserved' AND hold_until <= %(now)s
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
)
UPDATE checkout_reservations r
   SET state = 'released', released_at = %(now)s, release_reason = 'timeout'
  FROM due WHERE r.reservation_id = due.reservation_id
"""


def release_timed_out(conn: Conn, now: datetime, limit: int) -> int:
    """Release up to ``limit`` reservations whose hold has lapsed unpaid."""
    return conn.execute(RELEASE_TIMED_OUT, {"now": now, "limit": limit}).rowcount
