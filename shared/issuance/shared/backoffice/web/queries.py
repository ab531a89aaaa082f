"""Read-only SQL of the back office's pages that the catalog and the
reports do not already have: member and code lookup, dead letters, code
batches, and the promise of one activity. Rows are mapped by name."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from typing import Any

from issuance.shared import domain
from issuance.shared.db.analytics import NOT_HELD
from issuance.shared.db.store import Conn
from psycopg.rows import dict_row

Row = dict[str, Any]
LOOKUP_LIMIT = 200


def _all(conn: Conn, sql: str, params: Any) -> list[Row]:
    with conn.cursor(row_factory=dict_row) as cur:
        return list(cur.execute(sql, params).fetchall())


def _one(conn: Conn, sql: str, params: Any) -> Row | None:
    rows = _all(conn, sql, params)
    return rows[0] if rows else None


# Under any phone key still configured (a rotation in progress), the current one first.
MEMBER_BY_DIGEST = """
SELECT member_id, phone_masked, status, created_at, registered_at FROM members
 WHERE phone_digest = ANY(%s) ORDER BY array_position(%s, phone_digest) LIMIT 1
"""
MEMBER_BY_ID = """
SELECT member_id, phone_masked, status, created_at, registered_at FROM members WHERE member_id = %s
"""
MEMBER_CLAIMS = """
SELECT claim_id, activity_slug, status, reason, new_member, requested_at, credited_at, deadline
  FROM claims WHERE member_id = %s ORDER BY requested_at DESC LIMIT %s
"""
# Through the member's claims and rebates: codes have no index by member.
MEMBER_COUPONS = """
SELECT c.code, t.prefix, t.kind, t.value, t.threshold_cents, t.title, c.status, c.bound_at,
       c.expires_at, c.used_at, c.order_id, c.discount_cents
  FROM codes c JOIN coupon_templates t USING (template_id)
 WHERE c.claim_id IN (SELECT claim_id FROM claims WHERE member_id = %(member)s)
    OR c.rebate_id IN (SELECT rebate_id FROM rebates WHERE referrer_member_id = %(member)s)
 ORDER BY c.bound_at DESC NULLS LAST LIMIT %(limit)s
"""
MEMBER_WALLET = """
SELECT entry_id, claim_id, code, credited_at FROM wallet_ledger
 WHERE member_id = %s ORDER BY entry_id DESC LIMIT %s
"""
MEMBER_ORDERS = """
SELECT order_id, status, amount_cents, discount_cents, placed_at, paid_at, cancelled_at, refunded_at
  FROM orders WHERE member_id = %s ORDER BY placed_at DESC LIMIT %s
"""


def member_by_phone(conn: Conn, phone: str, *, region: str, keys: Sequence[tuple[str, str]]) -> Row | None:
    """A member by mobile number, normalised and digested as the claim path
    does under each (key ID, secret) of ``keys`` (raises domain.InvalidPhone
    for a number that is not one)."""
    e164 = domain.normalize_phone(phone, region)
    digests = [digest for _, digest in domain.phone_digests(e164, keys)]
    return _one(conn, MEMBER_BY_DIGEST, (digests, digests))


def member_by_id(conn: Conn, member_id: int) -> Row | None:
    return _one(conn, MEMBER_BY_ID, (member_id,))


def member_history(conn: Conn, member_id: int) -> dict[str, list[Row]]:
    return {
        "claims": _all(conn, MEMBER_CLAIMS, (member_id, LOOKUP_LIMIT)),
        "coupons": _all(conn, MEMBER_COUPONS, {"member": member_id, "limit": LOOKUP_LIMIT}),
        "wallet": _all(conn, MEMBER_WALLET, (member_id, LOOKUP_LIMIT)),
        "orders": _all(conn, MEMBER_ORDERS, (member_id, LOOKUP_LIMIT)),
    }


CODE = """
SELECT c.code, c.status, c.member_id, c.claim_id, c.rebate_id, c.batch_id, c.bound_at, c.expires_at,
       c.used_at, c.order_id, c.discount_cents, c.cancelled_at,
       t.prefix, t.kind, t.value, t.threshold_cents, t.title, a.slug AS activity
  FROM codes c JOIN coupon_templates t USING (template_id) JOIN activities a USING (activity_id)
 WHERE c.code = %s
"""
CLAIM = """
SELECT claim_id, activity_slug, status, reason, new_member, requested_at, credited_at, deadline
  FROM claims WHERE claim_id = %s
"""
CODE_WALLET = "SELECT entry_id, claim_id, code, credited_at FROM wallet_ledger WHERE code = %s"
ORDER = """
SELECT order_id, status, amount_cents, discount_cents, placed_at, paid_at, cancelled_at, refunded_at
  FROM orders WHERE order_id = %s
"""


def normalize_code(text: str) -> str:
    """A code as typed (lower case, spaces, dashes) in its stored form."""
    return "".join(ch for ch in text.upper() if ch.isalnum())


def code_history(conn: Conn, code: str) -> dict[str, Any] | None:
    """A code, its template and activity, and its claim, member, wallet
    entry and order where it has them."""
    row = _one(conn, CODE, (normalize_code(code),))
    if row is None:
        return None
    return {
        "code": row,
        "claim": _one(conn, CLAIM, (row["claim_id"],)) if row["claim_id"] else None,
        "member": member_by_id(conn, row["member_id"]) if row["member_id"] else None,
        "wallet": _all(conn, CODE_WALLET, (row["code"],)),
        "order": _one(conn, ORDER, (row["order_id"],)) if row["order_id"] else None,
    }


DEAD_LETTERS = """
SELECT dead_letter_id, created_at, queue, actor, reason, left(detail, 120) AS detail
  FROM dead_letters ORDER BY dead_letter_id DESC LIMIT %s OFFSET %s
"""
DEAD_LETTER = """
SELECT dead_letter_id, message_key, created_at, queue, actor, reason, detail, body, headers
  FROM dead_letters WHERE dead_letter_id = %s
"""
DEAD_LETTER_PAGE = 50


def dead_letters(conn: Conn, page: int) -> list[Row]:
    return _all(conn, DEAD_LETTERS, (DEAD_LETTER_PAGE + 1, (max(page, 1) - 1) * DEAD_LETTER_PAGE))


def dead_letter(conn: Conn, dead_letter_id: int) -> Row | None:
    """One dead letter, its body pretty-printed with any phone field masked
    (the workers mask them when they store it; this holds for older rows)."""
    row = _one(conn, DEAD_LETTER, (dead_letter_id,))
    if row is None:
        return None
    # A body that is not JSON (an undecodable delivery) is shown as it is.
    with contextlib.suppress(ValueError):
        row["body"] = json.dumps(_mask_phones(json.loads(row["body"])), indent=2, ensure_ascii=False)
    return row


def _mask_phones(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: (_masked(v) if k == "phone" and isinstance(v, str) else _mask_phones(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_mask_phones(v) for v in value]
    return value


def _masked(phone: str) -> str:
    return phone if "*" in phone else domain.mask_phone(phone)


BATCHES = """
SELECT b.batch_id, b.size, b.created_at, t.prefix
  FROM code_batches b JOIN coupon_templates t USING (template_id)
 WHERE t.activity_id = (SELECT activity_id FROM activities WHERE slug = %s)
 ORDER BY b.batch_id DESC
"""


def batches(conn: Conn, slug: str) -> list[Row]:
    return _all(conn, BATCHES, (slug,))


PROMISE = f"""
SELECT count(*) AS uncredited,
       count(*) FILTER (WHERE deadline <= now()) AS overdue,
       count(*) FILTER (WHERE deadline > now() AND deadline <= now() + interval '1 hour') AS at_risk_1h,
       count(*) FILTER (WHERE deadline > now() AND deadline <= now() + interval '6 hours') AS at_risk_6h,
       min(requested_at) AS oldest
  FROM claims
 WHERE status = 'bound' AND activity_id = (SELECT activity_id FROM activities WHERE slug = %s)
   AND {NOT_HELD}
"""


def promise(conn: Conn, slug: str) -> Row:
    """The activity's claims against the 24-hour promise: uncredited, past
    their deadline, and due within the hour or six hours."""
    row = _one(conn, PROMISE, (slug,))
    assert row is not None
    return row
