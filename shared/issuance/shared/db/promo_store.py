"""The SQL of shared promo codes (one code string many members use, up to a
cap) and of codes written off without an order (see
:mod:`issuance.shared.db.checkout_models`, migration 0015).

Functions take an open psycopg connection inside the caller's transaction
and never commit. The cap is the database's: a use is taken by one
conditional ``UPDATE ... WHERE uses < max_uses`` (and, per member, a
conditional upsert), which racing transactions serialize on the code's row,
and a check keeps ``uses`` within the cap whatever the code above does. A
use is one row per (promo, order), so asking again by order ID finds it.
The rules (window, threshold, scope) are those of
:mod:`issuance.shared.domain.checkout`: a promo code is read as a
:class:`~issuance.shared.domain.checkout.WalletCoupon`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from issuance.shared.db import checkout_store as ks
from issuance.shared.db.store import Conn
from issuance.shared.domain.checkout import CouponRules, WalletCoupon
from issuance.shared.domain.coupons import LifecycleRefusal, writeoff_refusal
from psycopg.rows import class_row, dict_row

# A promo code as checkout sees it, for one member and one order: the
# member's live uses on other orders, whether this order holds a use, and
# whether the cap leaves a use for an order that holds none.
PROMOS = """
SELECT p.code, p.promo_id, t.kind, t.value, t.threshold_cents, p.valid_from, p.valid_until,
       p.uses >= p.max_uses AS exhausted, p.per_member_limit,
       t.scope_products, t.scope_categories, t.scope_stores, t.min_items, t.min_member_level,
       t.stackable, t.priority,
       (SELECT count(*) FROM promo_uses u
         WHERE u.promo_id = p.promo_id AND u.member_id = %(member)s
           AND u.state IN ('reserved', 'redeemed') AND u.order_id <> %(order)s) AS member_uses,
       EXISTS (SELECT 1 FROM promo_uses u
                WHERE u.promo_id = p.promo_id AND u.order_id = %(order)s
                  AND u.state IN ('reserved', 'redeemed')) AS mine
  FROM promo_codes p JOIN coupon_templates t USING (template_id)
 WHERE p.code = ANY(%(codes)s) ORDER BY p.code
"""


def promo_of(row: dict[str, Any], *, member_id: int, order_id: str | None) -> WalletCoupon:
    """A row of PROMOS as checkout's rules see it. Its template ID is the
    promo's, negated, so that the per-person count of a set never mixes a
    promo code with its template's own coupons."""
    rules = CouponRules(
        products=frozenset(row["scope_products"]),
        categories=frozenset(row["scope_categories"]),
        stores=frozenset(row["scope_stores"]),
        min_items=row["min_items"],
        min_member_level=row["min_member_level"],
        stackable=row["stackable"],
        priority=row["priority"],
        per_person_limit=row["per_member_limit"],
    )
    return WalletCoupon(
        code=row["code"],
        member_id=member_id,
        kind=row["kind"],
        value=row["value"],
        threshold_cents=row["threshold_cents"],
        valid_from=row["valid_from"],
        expires_at=row["valid_until"],
        status="unused",
        held_by=order_id if row["mine"] else None,
        template_id=-row["promo_id"],
        rules=rules,
        member_uses=row["member_uses"],
        promo=True,
        exhausted=row["exhausted"],
    )


def promos_named(
    conn: Conn, codes: Sequence[str], *, member_id: int, order_id: str | None
) -> dict[str, tuple[int, WalletCoupon]]:
    """The named codes that are promo codes: code -> (promo ID, as a coupon)."""
    params = {"codes": sorted(set(codes)), "member": member_id, "order": order_id or ""}
    found = conn.cursor(row_factory=dict_row).execute(PROMOS, params).fetchall()
    return {r["code"]: (r["promo_id"], promo_of(r, member_id=member_id, order_id=order_id)) for r in found}


# The cap: the row's own check refuses more, and the WHERE never asks for it.
TAKE = "UPDATE promo_codes SET uses = uses + 1 WHERE promo_id = %s AND uses < max_uses RETURNING uses"
TAKE_FOR_MEMBER = """
INSERT INTO promo_member_uses AS m (promo_id, member_id, uses) VALUES (%(promo)s, %(member)s, 1)
ON CONFLICT (promo_id, member_id) DO UPDATE SET uses = m.uses + 1
 WHERE m.uses < coalesce((SELECT per_member_limit FROM promo_codes WHERE promo_id = %(promo)s), m.uses + 1)
RETURNING uses
"""
INSERT_USE = """
INSERT INTO promo_uses
       (promo_id, order_id, member_id, amount_cents, items, discount_cents, reserved_at, hold_until)
VALUES (%(promo)s, %(order_id)s, %(member)s, %(amount)s, %(items)s, %(discount)s, %(at)s, %(hold_until)s)
ON CONFLICT (promo_id, order_id) DO NOTHING
"""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class UseRequest:
    promo_id: int
    order_id: str
    member_id: int
    amount_cents: int
    items: int
    discount_cents: int
    at: datetime
    hold_until: datetime


def take_use(conn: Conn, use: UseRequest) -> LifecycleRefusal | None:
    """Take one use of a promo code for an order: None when taken, else why
    not (the cap reached, the member's limit reached, or the order holding
    one already). On a refusal the caller rolls its transaction back."""
    if conn.execute(TAKE, (use.promo_id,)).fetchone() is None:
        return LifecycleRefusal.PROMO_EXHAUSTED
    if conn.execute(TAKE_FOR_MEMBER, {"promo": use.promo_id, "member": use.member_id}).fetchone() is None:
        return LifecycleRefusal.PER_PERSON_LIMIT
    params = {
        "promo": use.promo_id,
        "order_id": use.order_id,
        "member": use.member_id,
        "amount": use.amount_cents,
        "items": use.items,
        "discount": use.discount_cents,
        "at": use.at,
        "hold_until": use.hold_until,
    }
    if conn.execute(INSERT_USE, params).rowcount != 1:
        return LifecycleRefusal.ORDER_CONFLICT
    return None


USES_OF_ORDER = """
SELECT u.order_id, p.code, u.member_id, u.state, u.amount_cents, u.items, u.discount_cents,
       u.reserved_at, u.hold_until, u.redeemed_at, u.released_at, u.release_reason, true AS promo
  FROM promo_uses u JOIN promo_codes p USING (promo_id)
 WHERE u.order_id = %s ORDER BY p.code
"""


def uses_of(conn: Conn, order_id: str, *, lock: bool = False) -> list[ks.ReservationRow]:
    """An order's promo code uses, as reservations."""
    sql = USES_OF_ORDER + (" FOR UPDATE OF u" if lock else "")
    return conn.cursor(row_factory=class_row(ks.ReservationRow)).execute(sql, (order_id,)).fetchall()


MARK_REDEEMED = """
UPDATE promo_uses SET state = 'redeemed', redeemed_at = %s WHERE order_id = %s AND state = 'reserved'
"""


def mark_redeemed(conn: Conn, order_id: str, at: datetime) -> int:
    return conn.execute(MARK_REDEEMED, (at, order_id)).rowcount


# A use released gives its place back under the cap, and to its member.
RELEASE = """
WITH gone AS (
    UPDATE promo_uses u
       SET state = 'released', released_at = %(at)s, release_reason = %(reason)s, redeemed_at = NULL
     WHERE u.use_id IN ({which}) AND u.state = ANY(%(states)s) AND u.voided_at IS NULL
    RETURNING u.promo_id, u.member_id
), per_code AS (
    UPDATE promo_codes p SET uses = p.uses - g.n
      FROM (SELECT promo_id, count(*) AS n FROM gone GROUP BY promo_id) g
     WHERE p.promo_id = g.promo_id
), per_member AS (
    UPDATE promo_member_uses m SET uses = m.uses - g.n
      FROM (SELECT promo_id, member_id, count(*) AS n FROM gone GROUP BY promo_id, member_id) g
     WHERE (m.promo_id, m.member_id) = (g.promo_id, g.member_id)
)
SELECT count(*) FROM gone
"""
OF_ORDER = "SELECT use_id FROM promo_uses WHERE order_id = %(order_id)s"
TIMED_OUT = """
SELECT use_id FROM promo_uses WHERE state = 'reserved' AND hold_until <= %(at)s
 ORDER BY use_id LIMIT %(limit)s FOR UPDATE SKIP LOCKED
"""


# The promo codes a release will count down, locked first in code order, the
# order in which a reservation takes them: an order releasing two codes and
# another taking the same two cannot deadlock.
LOCK_CODES = """
SELECT 1 FROM promo_codes WHERE promo_id IN (SELECT promo_id FROM promo_uses u WHERE {where})
 ORDER BY code FOR UPDATE
"""
LOCK_OF_ORDER = LOCK_CODES.format(where="u.order_id = %(order_id)s AND u.state = ANY(%(states)s)")
LOCK_DUE = LOCK_CODES.format(where="u.state = 'reserved' AND u.hold_until <= %(at)s")


def _released(conn: Conn, which: str, params: dict[str, Any]) -> int:
    conn.execute(LOCK_OF_ORDER if which == OF_ORDER else LOCK_DUE, params)
    row = conn.execute(RELEASE.format(which=which), params).fetchone()
    return int(row[0]) if row else 0


def release_order(
    conn: Conn, order_id: str, at: datetime, reason: str, *, states: Sequence[str] = ("reserved",)
) -> int:
    """Release an order's uses in ``states`` (never a voided one): their
    places go back under the code's cap and the member's limit."""
    params = {"order_id": order_id, "at": at, "reason": reason, "states": list(states)}
    return _released(conn, OF_ORDER, params)


def release_timed_out(conn: Conn, now: datetime, limit: int) -> int:
    """Release up to ``limit`` uses whose hold lapsed unpaid."""
    params = {"at": now, "limit": limit, "reason": "timeout", "states": ["reserved"]}
    return _released(conn, TIMED_OUT, params)


VOID = """
UPDATE promo_uses SET voided_at = %s WHERE order_id = %s AND state = 'redeemed' AND voided_at IS NULL
"""


def void_order(conn: Conn, order_id: str, at: datetime) -> int:
    """A refund after payment: the order's redeemed uses stay spent (counted
    under the cap), marked voided."""
    return conn.execute(VOID, (at, order_id)).rowcount


# --- promo codes as an operator makes them ----------------------------------

INSERT_PROMO = """
INSERT INTO promo_codes (code, template_id, valid_from, valid_until, max_uses, per_member_limit)
SELECT %(code)s, t.template_id, %(valid_from)s, %(valid_until)s, %(max_uses)s, %(per_member)s
  FROM coupon_templates t WHERE t.prefix = %(template)s
ON CONFLICT (code) DO NOTHING
RETURNING promo_id
"""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PromoSpec:
    code: str
    template: str
    max_uses: int
    per_member_limit: int | None = None
    valid_from: datetime | None = None
    valid_until: datetime | None = None


def insert_promo(conn: Conn, spec: PromoSpec) -> int | None:
    """Create a promo code on a template (by its prefix); None when the code
    exists already or the template does not (the caller tells which)."""
    params = {
        "code": spec.code,
        "template": spec.template,
        "valid_from": spec.valid_from,
        "valid_until": spec.valid_until,
        "max_uses": spec.max_uses,
        "per_member": spec.per_member_limit,
    }
    row = conn.execute(INSERT_PROMO, params).fetchone()
    return None if row is None else int(row[0])


# --- written off without an order ---------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class WriteOffTarget:
    code: str
    status: str
    kind: str
    member_id: int | None
    expires_at: datetime | None
    held: bool


# Locked first, then read in a statement of its own: under READ COMMITTED
# the read then sees a reservation committed while the lock was awaited
# (a subquery of the locking statement would not).
LOCK_CODE = "SELECT 1 FROM codes WHERE code = %s FOR UPDATE"
TARGET = """
SELECT c.code, c.status, t.kind, c.member_id, c.expires_at,
       EXISTS (SELECT 1 FROM checkout_reservations r
                WHERE r.code = c.code AND r.state IN ('reserved', 'redeemed')) AS held
  FROM codes c JOIN coupon_templates t USING (template_id)
 WHERE c.code = %s
"""


def lock_writeoff_target(conn: Conn, code: str) -> WriteOffTarget | None:
    """The code and what a write-off depends on, the code locked."""
    conn.execute(LOCK_CODE, (code,))
    return conn.cursor(row_factory=class_row(WriteOffTarget)).execute(TARGET, (code,)).fetchone()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class WriteOff:
    """The audit record of a code written off without an order."""

    code: str
    channel: str
    written_off_by: str
    reason: str
    member_id: int | None
    written_off_at: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "channel": self.channel,
            "written_off_by": self.written_off_by,
            "reason": self.reason,
            "member_id": self.member_id,
            "written_off_at": self.written_off_at.isoformat(),
        }


WRITEOFF_OF = """
SELECT code, channel, written_off_by, reason, member_id, written_off_at FROM code_writeoffs WHERE code = %s
"""
WRITE_OFF = """
WITH audit AS (
    INSERT INTO code_writeoffs (code, channel, written_off_by, reason, member_id, written_off_at)
    VALUES (%(code)s, %(channel)s, %(by)s, %(reason)s, %(member)s, %(at)s)
    RETURNING code
)
UPDATE codes SET status = 'written_off' WHERE code IN (SELECT code FROM audit)
"""


def writeoff_of(conn: Conn, code: str) -> WriteOff | None:
    return conn.cursor(row_factory=class_row(WriteOff)).execute(WRITEOFF_OF, (code,)).fetchone()


def write_off(conn: Conn, record: WriteOff) -> None:
    """Mark the (locked) code written off, with its audit record."""
    params = {
        "code": record.code,
        "channel": record.channel,
        "by": record.written_off_by,
        "reason": record.reason,
        "member": record.member_id,
        "at": record.written_off_at,
    }
    conn.execute(WRITE_OFF, params)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class WriteOffAnswer:
    """A write-off's answer: the audit record (the first one, when the code
    was written off already: ``repeated``), or why the code was refused."""

    record: WriteOff | None = None
    refusal: LifecycleRefusal | None = None
    repeated: bool = False


def write_off_code(
    conn: Conn, code: str, *, channel: str, by: str, reason: str, at: datetime
) -> WriteOffAnswer:
    """Redeem ``code`` without an order, in the caller's transaction: a gift
    coupon or a partner's or printed code (the rule of
    :func:`issuance.shared.domain.coupons.writeoff_refusal`). Idempotent:
    a code written off already answers with its first audit record."""
    target = lock_writeoff_target(conn, code)
    if target is None:
        return WriteOffAnswer(refusal=LifecycleRefusal.UNKNOWN_CODE)
    if target.status == "written_off":
        return WriteOffAnswer(record=writeoff_of(conn, code), repeated=True)
    refusal = writeoff_refusal(
        status=target.status, kind=target.kind, expires_at=target.expires_at, held=target.held, at=at
    )
    if refusal is not None:
        return WriteOffAnswer(refusal=refusal)
    record = WriteOff(
        code=code,
        channel=channel,
        written_off_by=by,
        reason=reason,
        member_id=target.member_id,
        written_off_at=at,
    )
    write_off(conn, record)
    return WriteOffAnswer(record=record)
