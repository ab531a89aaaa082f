"""All SQL of the hot path, in one module, readable and named.

Functions take an open psycopg connection (inside the caller's transaction)
and return plain values or frozen rows. Nothing here commits.
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import datetime
from typing import Any

from psycopg import Connection
from psycopg.types.json import Jsonb

from shared.domain import ActivityRules, TemplateRef

Conn = Connection[Any]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ActivityRow:
    activity_id: int
    slug: str
    rules: ActivityRules
    timezone: str
    exclusivity_group: str
    validity_days: int | None
    valid_until: datetime | None
    templates: tuple[TemplateRef, ...]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ClaimRow:
    claim_id: uuid.UUID
    status: str
    reason: str | None
    member_id: int | None
    payload_digest: bytes


ACTIVITY_BY_SLUG = """
SELECT a.activity_id, a.slug, a.online, a.starts_at, a.ends_at, a.timezone,
       a.exclusivity_group, a.validity_days, a.valid_until,
       coalesce(array_agg(t.template_id ORDER BY t.position) FILTER (WHERE t.template_id IS NOT NULL), '{}'),
       coalesce(array_agg(t.new_user_only ORDER BY t.position) FILTER (WHERE t.template_id IS NOT NULL), '{}')
  FROM activities a
  LEFT JOIN coupon_templates t ON t.activity_id = a.activity_id
 WHERE a.slug = %s
 GROUP BY a.activity_id
"""


def activity_by_slug(conn: Conn, slug: str) -> ActivityRow | None:
    row = conn.execute(ACTIVITY_BY_SLUG, (slug,)).fetchone()
    if row is None:
        return None
    (activity_id, slug, online, starts_at, ends_at, tz, group, days, until, template_ids, new_only) = row
    return ActivityRow(
        activity_id=activity_id,
        slug=slug,
        rules=ActivityRules(online=online, starts_at=starts_at, ends_at=ends_at),
        timezone=tz,
        exclusivity_group=group,
        validity_days=days,
        valid_until=until,
        templates=tuple(
            TemplateRef(template_id=t, new_user_only=n) for t, n in zip(template_ids, new_only, strict=True)
        ),
    )


def claim_by_id(conn: Conn, claim_id: uuid.UUID, *, lock: bool = False) -> ClaimRow | None:
    sql = "SELECT claim_id, status, reason, member_id, payload_digest FROM claims WHERE claim_id = %s"
    row = conn.execute(sql + (" FOR UPDATE" if lock else ""), (claim_id,)).fetchone()
    if row is None:
        return None
    return ClaimRow(claim_id=row[0], status=row[1], reason=row[2], member_id=row[3], payload_digest=row[4])


UPSERT_MEMBER = """
INSERT INTO members (phone_digest, phone_masked, status) VALUES (%s, %s, 'pending')
ON CONFLICT (phone_digest) DO NOTHING
RETURNING member_id
"""


def lock_member(conn: Conn, digest: bytes, masked: str) -> tuple[int, bool]:
    """Resolve the member behind a number, creating a pending one if needed,
    and lock its row: claims of one member are decided one at a time (no
    global lock: other members go on in parallel). Returns (member_id, created)."""
    row = conn.execute(UPSERT_MEMBER, (digest, masked)).fetchone()
    if row is not None:
        return int(row[0]), True
    row = conn.execute(
        "SELECT member_id FROM members WHERE phone_digest = %s FOR UPDATE", (digest,)
    ).fetchone()
    assert row is not None, "a member whose insert conflicted must exist"
    return int(row[0]), False


MEMBER_HISTORY = """
SELECT count(*) > 0,
       coalesce(bool_or(activity_id = %(activity_id)s), false),
       coalesce(bool_or(exclusivity_group = %(group)s), false)
  FROM claims
 WHERE member_id = %(member_id)s AND status <> 'refused'
"""


def member_history(conn: Conn, member_id: int, activity_id: int, group: str) -> tuple[bool, bool, bool]:
    """(has any package on the platform, has this activity's, has one of its group)."""
    row = conn.execute(MEMBER_HISTORY, {"member_id": member_id, "activity_id": activity_id, "group": group})
    has_any, same_activity, same_group = row.fetchone() or (False, False, False)
    return bool(has_any), bool(same_activity), bool(same_group)


# SKIP LOCKED spreads concurrent claims over free rows instead of queueing
# them on one; when it finds nothing, a blocking pass makes sure rows held by
# transactions that roll back are not mistaken for "sold out".
TAKE_SLOT = """
UPDATE package_slots SET taken = true
 WHERE (activity_id, slot_no) = (
       SELECT activity_id, slot_no FROM package_slots
        WHERE activity_id = %s AND NOT taken
        LIMIT 1 FOR UPDATE {skip})
RETURNING slot_no
"""


def take_slot(conn: Conn, activity_id: int) -> int | None:
    for skip in ("SKIP LOCKED", ""):
        row = conn.execute(TAKE_SLOT.format(skip=skip), (activity_id,)).fetchone()
        if row is not None:
            return int(row[0])
    return None


BIND_CODE = """
UPDATE codes SET status = 'unused', member_id = %(member_id)s, claim_id = %(claim_id)s,
       bound_at = now(), expires_at = %(expires_at)s
 WHERE code = (
       SELECT code FROM codes
        WHERE template_id = %(template_id)s AND status = 'available'
        LIMIT 1 FOR UPDATE {skip})
RETURNING code
"""


def bind_code(
    conn: Conn, *, template_id: int, claim_id: uuid.UUID, member_id: int, expires_at: datetime
) -> str | None:
    """Bind one available code of the template to the claim's member."""
    params = {
        "template_id": template_id,
        "claim_id": claim_id,
        "member_id": member_id,
        "expires_at": expires_at,
    }
    for skip in ("SKIP LOCKED", ""):
        row = conn.execute(BIND_CODE.format(skip=skip), params).fetchone()
        if row is not None:
            return str(row[0])
    return None


INSERT_CLAIM = """
INSERT INTO claims (claim_id, activity_slug, activity_id, exclusivity_group, member_id, share_id,
                    slot_no, status, reason, new_member, payload_digest, requested_at, deadline)
VALUES (%(claim_id)s, %(activity_slug)s, %(activity_id)s, %(group)s, %(member_id)s, %(share_id)s,
        %(slot_no)s, %(status)s, %(reason)s, %(new_member)s, %(payload_digest)s, %(requested_at)s,
        %(deadline)s)
ON CONFLICT (claim_id) DO NOTHING
RETURNING claim_id
"""


def insert_claim(conn: Conn, **values: Any) -> bool:
    """Record a claim's decision; False when the claim ID is already recorded."""
    defaults: dict[str, Any] = {"activity_id": None, "group": None, "member_id": None, "share_id": None}
    defaults.update(slot_no=None, reason=None, new_member=False)
    return conn.execute(INSERT_CLAIM, {**defaults, **values}).fetchone() is not None


CREDIT_CLAIM = """
WITH credited AS (
    INSERT INTO wallet_ledger (member_id, claim_id, code)
    SELECT member_id, claim_id, code FROM codes WHERE claim_id = %(claim_id)s
    ON CONFLICT (claim_id, code) DO NOTHING
    RETURNING code
)
SELECT count(*) FROM credited
"""


def credit_claim(conn: Conn, claim_id: uuid.UUID) -> int:
    """Write the wallet entries of a bound claim (each at most once) and mark
    it credited. Returns how many entries this call wrote."""
    row = conn.execute(CREDIT_CLAIM, {"claim_id": claim_id}).fetchone()
    conn.execute(
        "UPDATE claims SET status = 'credited', credited_at = now() WHERE claim_id = %s AND status = 'bound'",
        (claim_id,),
    )
    return int(row[0]) if row else 0


def claim_codes(conn: Conn, claim_id: uuid.UUID) -> list[str]:
    rows = conn.execute("SELECT code FROM codes WHERE claim_id = %s ORDER BY code", (claim_id,)).fetchall()
    return [r[0] for r in rows]


OPEN_SHARE = """
INSERT INTO shares (share_id, order_id, activity_id, referrer_member_id, placed_at)
VALUES (%s, %s, (SELECT activity_id FROM activities WHERE slug = %s), %s, %s)
ON CONFLICT (order_id) DO NOTHING
RETURNING share_id
"""


def open_share(
    conn: Conn,
    *,
    share_id: uuid.UUID,
    order_id: str,
    activity: str | None,
    referrer: int,
    placed_at: datetime,
) -> bool:
    """Open the share of an order; False when it was already open."""
    row = conn.execute(OPEN_SHARE, (share_id, order_id, activity, referrer, placed_at)).fetchone()
    return row is not None


def record_share_open(conn: Conn, *, event_id: uuid.UUID, share_id: uuid.UUID, opened_at: datetime) -> bool:
    sql = "INSERT INTO share_opens (event_id, share_id, opened_at) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING"
    return conn.execute(sql, (event_id, share_id, opened_at)).rowcount == 1


INSERT_DEAD_LETTER = """
INSERT INTO dead_letters (message_key, queue, actor, reason, detail, body, headers)
VALUES (%s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (message_key, reason) DO NOTHING
"""


def insert_dead_letter(
    conn: Conn,
    *,
    message_key: str,
    queue: str,
    actor: str,
    reason: str,
    detail: str,
    body: str,
    headers: dict[str, Any] | None = None,
) -> bool:
    """Keep a message that cannot be used, with its reason; once per (message, reason)."""
    # PostgreSQL text cannot hold NUL; a garbage body must still be kept.
    detail, body = (v.replace("\x00", "\\x00") for v in (detail[:2000], body))
    params = (message_key, queue, actor, reason, detail, body, Jsonb(headers) if headers else None)
    return conn.execute(INSERT_DEAD_LETTER, params).rowcount == 1
