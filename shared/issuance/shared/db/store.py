"""All SQL of the hot path, in one module, readable and named.

Functions take an open psycopg connection (inside the caller's transaction)
and return plain values or frozen rows. Nothing here commits.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from issuance.shared.domain import ActivityRules, Refusal, TemplateRef
from issuance.shared.domain.claims import ActivityTerms, ClaimStatus, Holding
from psycopg import Connection
from psycopg.rows import kwargs_row
from psycopg.types.json import Jsonb

Conn = Connection[Any]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ClaimRow:
    claim_id: uuid.UUID
    status: ClaimStatus
    reason: Refusal | None
    member_id: int | None
    payload_digest: bytes

    @classmethod
    def from_row(
        cls,
        *,
        claim_id: uuid.UUID,
        status: str,
        reason: str | None,
        member_id: int | None,
        payload_digest: bytes,
    ) -> ClaimRow:
        return cls(
            claim_id=claim_id,
            status=ClaimStatus(status),
            reason=None if reason is None else Refusal(reason),
            member_id=member_id,
            payload_digest=payload_digest,
        )


ACTIVITY_BY_SLUG = """
SELECT a.activity_id, a.slug, a.online, a.starts_at, a.ends_at, a.timezone,
       a.exclusivity_group, a.validity_days, a.valid_until, a.hold_until_registered, a.regions,
       coalesce(array_agg(t.template_id ORDER BY t.position) FILTER (WHERE t.template_id IS NOT NULL), '{}')
           AS template_ids,
       coalesce(array_agg(t.new_user_only ORDER BY t.position) FILTER (WHERE t.template_id IS NOT NULL), '{}')
           AS new_user_only
  FROM activities a
  LEFT JOIN coupon_templates t ON t.activity_id = a.activity_id
 WHERE a.slug = %s
 GROUP BY a.activity_id
"""


def _activity_terms(
    *,
    activity_id: int,
    slug: str,
    online: bool,
    starts_at: datetime,
    ends_at: datetime,
    timezone: str,
    exclusivity_group: str,
    validity_days: int | None,
    valid_until: datetime | None,
    hold_until_registered: bool,
    regions: list[str],
    template_ids: list[int],
    new_user_only: list[bool],
) -> ActivityTerms:
    return ActivityTerms(
        activity_id=activity_id,
        slug=slug,
        rules=ActivityRules(online=online, starts_at=starts_at, ends_at=ends_at),
        timezone=timezone,
        exclusivity_group=exclusivity_group,
        validity_days=validity_days,
        valid_until=valid_until,
        hold_until_registered=hold_until_registered,
        templates=tuple(
            TemplateRef(template_id=t, new_user_only=n)
            for t, n in zip(template_ids, new_user_only, strict=True)
        ),
        regions=tuple(regions),
    )


def activity_by_slug(conn: Conn, slug: str) -> ActivityTerms | None:
    """What the claim decision needs to know about an activity, with its
    package's templates in order."""
    return conn.cursor(row_factory=kwargs_row(_activity_terms)).execute(ACTIVITY_BY_SLUG, (slug,)).fetchone()


# Lookups by ID in tables that grow during a campaign are not prepared on the
# server: a generic plan made while the table was small (a sequential scan)
# would outlive its growth until the next ANALYZE. Found on a server without
# autovacuum: single-claim deliveries fell from ~1,600 to ~185 claims/s as
# claim lookups scanned a growing table. Planning these three each time cost
# nothing measurable on packed batches (1.04x per claim, median of three
# interleaved pairs); forcing custom plans on every statement cost 1.37x.
def claims_by_ids(
    conn: Conn, claim_ids: Sequence[uuid.UUID], *, lock: bool = False
) -> dict[uuid.UUID, ClaimRow]:
    sql = "SELECT claim_id, status, reason, member_id, payload_digest FROM claims WHERE claim_id = ANY(%b)"
    if lock:
        sql += " ORDER BY claim_id FOR UPDATE"
    cursor = conn.cursor(row_factory=kwargs_row(ClaimRow.from_row))
    return {row.claim_id: row for row in cursor.execute(sql, (list(claim_ids),), prepare=False)}


def _claim_lock_key(claim_id: uuid.UUID) -> int:
    return (claim_id.int >> 64) - (1 << 63)


def lock_claim_ids(conn: Conn, claim_ids: Sequence[uuid.UUID]) -> None:
    """Serialise concurrent deliveries of the same claims (transaction-level
    advisory locks, taken in one global order so batches cannot deadlock)."""
    keys = sorted({_claim_lock_key(c) for c in claim_ids})
    conn.execute("SELECT count(pg_advisory_xact_lock(k)) FROM unnest(%b::bigint[]) AS k", (keys,))


def try_lock_claim_ids(conn: Conn, claim_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    """Take the locks of :func:`lock_claim_ids` that are free now, without
    waiting for any; returns the claims locked. A claim left out is being
    decided by a concurrent transaction. (Nothing waits, so no order is
    needed against deadlocks.)"""
    keys: dict[int, list[uuid.UUID]] = {}
    for claim_id in claim_ids:
        keys.setdefault(_claim_lock_key(claim_id), []).append(claim_id)
    rows = conn.execute(
        "SELECT k FROM unnest(%b::bigint[]) AS k WHERE pg_try_advisory_xact_lock(k)", (list(keys),)
    )
    return {claim_id for (k,) in rows for claim_id in keys[k]}


# DO UPDATE ... WHERE <false> updates nothing but locks every conflicting row,
# in the order of the (sorted) input: concurrent batches wait for each other
# in one global order instead of deadlocking. It writes only the ring slot of
# a member from before migration 0022 (once): a handover of ring slots
# between cells finds its members by it (issuance.shared.db.cells).
UPSERT_MEMBERS = """
INSERT INTO members (phone_digest, phone_masked, status, phone_key_id, ring_slot)
SELECT d, m, 'pending', %s, s FROM unnest(%b::bytea[], %b::text[], %b::smallint[]) AS u(d, m, s) ORDER BY d
ON CONFLICT (phone_digest) DO UPDATE SET ring_slot = EXCLUDED.ring_slot WHERE members.ring_slot IS NULL
RETURNING phone_digest, member_id
"""
LOCK_MEMBERS = """
SELECT phone_digest, member_id FROM members WHERE phone_digest = ANY(%b)
"""


def lock_members(
    conn: Conn, numbers: dict[bytes, str], *, key_id: str, ring_slots: Mapping[bytes, int]
) -> dict[bytes, int]:
    """Resolve the members behind phone digests (made with the phone key
    ``key_id``), creating pending ones where needed, and lock their rows: the
    claims of one member are decided one at a time (no global lock: other
    members go on in parallel). Members still stored under an older key are
    re-keyed first (:func:`rekey_members`). ``ring_slots``: each digest's
    ring slot (issuance.shared.domain.cells.route_slot of its number)."""
    digests = sorted(numbers)
    rows = conn.execute(
        UPSERT_MEMBERS, (key_id, digests, [numbers[d] for d in digests], [ring_slots[d] for d in digests])
    )
    members = {bytes(d): int(m) for d, m in rows}  # the new ones (and those given their ring slot now)
    known = [d for d in digests if d not in members]
    if known:
        members.update((bytes(d), int(m)) for d, m in conn.execute(LOCK_MEMBERS, (known,), prepare=False))
    return members


# Phone key rotation (deploy/SECURITY.md): a member whose digest was made
# with an older key still listed is moved to the current key's digest, so
# that the number stays one member. One member per number (the lowest ID,
# should an older bug have made two), and none where the current digest is
# taken already.
REKEY_MEMBERS = """
WITH found AS (
    SELECT DISTINCT ON (u.new) m.member_id, u.new
      FROM unnest(%b::bytea[], %b::bytea[]) AS u(old, new)
      JOIN members m ON m.phone_digest = u.old
     WHERE NOT EXISTS (SELECT FROM members c WHERE c.phone_digest = u.new)
     ORDER BY u.new, m.member_id
)
UPDATE members SET phone_digest = found.new, phone_key_id = %s
  FROM found WHERE members.member_id = found.member_id
RETURNING members.member_id, members.phone_digest
"""
# Two-integer advisory locks: a key space apart from lock_claim_ids' bigints.
DIGEST_LOCK_CLASS = 0x70686B  # "phk"


def rekey_members(
    conn: Conn, key_id: str, numbers: Sequence[Sequence[tuple[str, bytes]]]
) -> list[tuple[int, bytes]]:
    """Move members found under an older phone key to the current one
    (``key_id``). ``numbers`` holds each number's (key ID, digest) under
    every configured key, the current one first. Returns (member, current
    digest) of each member moved; no statement at all with a single key.

    Each number's digests are locked first (transaction-level advisory
    locks, one global order): two processes whose current keys differ
    while a rotation rolls out share at least one key, so they cannot both
    see "no member" and create the number twice."""
    pairs = [(digest, digests[0][1]) for digests in numbers for _, digest in digests[1:]]
    if not pairs:
        return []
    locks = sorted({int.from_bytes(d[:4], "big", signed=True) for ds in numbers for _, d in ds})
    conn.execute(
        "SELECT count(pg_advisory_xact_lock(%s, k)) FROM unnest(%b::int[]) AS k", (DIGEST_LOCK_CLASS, locks)
    )
    old, new = (list(column) for column in zip(*pairs, strict=True))
    rows = conn.execute(REKEY_MEMBERS, (old, new, key_id), prepare=False)
    return [(int(member), bytes(digest)) for member, digest in rows]


# A member moved in from another cell also holds what it held there
# (member_holdings, by slug; 0 when the activity is not in this cell, which
# then still counts for its exclusivity group).
MEMBER_GRANTS = """
SELECT member_id, activity_id, exclusivity_group FROM claims
 WHERE member_id = ANY(%(m)b) AND status <> 'refused'
UNION ALL
SELECT h.member_id, coalesce(a.activity_id, 0), h.exclusivity_group
  FROM member_holdings h LEFT JOIN activities a ON a.slug = h.activity_slug
 WHERE h.member_id = ANY(%(m)b)
"""


def member_grants(conn: Conn, member_ids: Sequence[int]) -> dict[int, list[Holding]]:
    """The packages each member already holds."""
    grants: dict[int, list[Holding]] = {m: [] for m in member_ids}
    for member_id, activity_id, group in conn.execute(MEMBER_GRANTS, {"m": list(member_ids)}, prepare=False):
        grants[member_id].append(Holding(activity_id, group))
    return grants


# Pools are handed out in order (codes by generation order, slots by number),
# and each process remembers where its last allocation of a pool ended: the
# next one enters the index there instead of walking over the entries of rows
# just taken, which stay in the index until vacuum reaches them (after 90% of
# a pool was bound, a walk from the start halved the allocation rate).
# SKIP LOCKED spreads concurrent batches over free rows instead of queueing
# them on one. When the rows past the mark run short, a pass from the start
# finds rows left behind (taken by a transaction that rolled back, or
# returned to the pool); it waits for locked rows, so rows held by a
# transaction that rolls back are not mistaken for "sold out".
FREE_SLOTS = """
SELECT slot_no, slot_no FROM package_slots
 WHERE activity_id = %s AND NOT taken AND slot_no > %s AND slot_no <> ALL(%b::int[])
 ORDER BY slot_no LIMIT %s FOR UPDATE {skip}
"""
FREE_CODES = """
SELECT code, seq FROM codes
 WHERE template_id = %s AND status = 'available' AND seq > %s AND code <> ALL(%b::text[])
 ORDER BY seq LIMIT %s FOR UPDATE {skip}
"""

# (statement, pool key) -> the position the last allocation in this process
# reached. Shared by threads: a lost update only costs a longer walk.
_marks: dict[tuple[str, int], int] = {}


def _lock_free(conn: Conn, sql: str, key: int, count: int) -> list[Any]:
    mark = _marks.get((sql, key), -1)
    found: list[Any] = []
    for after, skip in ((mark, "SKIP LOCKED"), (-1, "")):
        if len(found) >= count:
            break
        rows = conn.execute(sql.format(skip=skip), (key, after, found, count - len(found))).fetchall()
        found += [r[0] for r in rows]
        if rows and after == mark:
            _marks[(sql, key)] = max(_marks.get((sql, key), -1), rows[-1][1])
    return found


def lock_free_slots(conn: Conn, activity_id: int, count: int) -> list[int]:
    """Lock up to ``count`` free package slots of an activity."""
    return _lock_free(conn, FREE_SLOTS, activity_id, count)


def lock_free_codes(conn: Conn, template_id: int, count: int) -> list[str]:
    """Lock up to ``count`` available codes of a template."""
    return _lock_free(conn, FREE_CODES, template_id, count)


# A claim credited in this transaction is stamped when its row is written
# (clock_timestamp(): now() would be the transaction's start, before the
# batch's decisions), the closest the row can come to the commit.
INSERT_CLAIMS = """
INSERT INTO claims (claim_id, activity_slug, activity_id, exclusivity_group, member_id, share_id,
                    slot_no, status, reason, new_member, payload_digest, requested_at, deadline,
                    credited_at)
SELECT u.*, CASE WHEN u.status = 'credited' THEN clock_timestamp() END
  FROM unnest(%b::uuid[], %b::text[], %b::int[], %b::text[], %b::bigint[], %b::uuid[],
              %b::int[], %b::text[], %b::text[], %b::bool[], %b::bytea[], %b::timestamptz[],
              %b::timestamptz[])
       AS u(claim_id, activity_slug, activity_id, exclusivity_group, member_id, share_id,
            slot_no, status, reason, new_member, payload_digest, requested_at, deadline)
ON CONFLICT (claim_id) DO NOTHING
"""
CLAIM_COLUMNS = (
    "claim_id",
    "activity_slug",
    "activity_id",
    "group",
    "member_id",
    "share_id",
    "slot_no",
    "status",
    "reason",
    "new_member",
    "payload_digest",
    "requested_at",
    "deadline",
)


def insert_claims(conn: Conn, rows: Sequence[dict[str, Any]]) -> int:
    """Record claim decisions; returns how many were new (a claim ID already
    recorded by a concurrent delivery is skipped)."""
    columns = [[row.get(c) for row in rows] for c in CLAIM_COLUMNS]
    return conn.execute(INSERT_CLAIMS, columns).rowcount


# "code = ANY(...)" makes the plan a primary-key lookup per code whatever the
# statistics say; a bare join on unnest() can turn into a scan of the pool.
BIND_CODES = """
UPDATE codes SET status = 'unused', member_id = u.member_id, claim_id = u.claim_id,
       bound_at = now(), expires_at = u.expires_at
  FROM unnest(%(codes)b::varchar[], %(claims)b::uuid[], %(members)b::bigint[], %(expiry)b::timestamptz[])
       AS u(code, claim_id, member_id, expires_at)
 WHERE codes.code = ANY(%(codes)b::varchar[]) AND codes.code = u.code
"""
TAKE_SLOTS = "UPDATE package_slots SET taken = true WHERE activity_id = %s AND slot_no = ANY(%b::int[])"


def bind_codes(conn: Conn, bindings: Sequence[tuple[str, uuid.UUID, int, datetime]]) -> int:
    """Bind locked codes: (code, claim, member, expiry) each."""
    if not bindings:
        return 0
    codes, claims, members, expiry = (list(col) for col in zip(*bindings, strict=True))
    params = {"codes": codes, "claims": claims, "members": members, "expiry": expiry}
    return conn.execute(BIND_CODES, params).rowcount


def take_slots(conn: Conn, slots: Sequence[tuple[int, int]]) -> int:
    """Mark locked package slots taken: (activity, slot) each."""
    by_activity: dict[int, list[int]] = {}
    for activity_id, slot_no in slots:
        by_activity.setdefault(activity_id, []).append(slot_no)
    return sum(conn.execute(TAKE_SLOTS, (a, s)).rowcount for a, s in by_activity.items())


WRITE_WALLET = """
INSERT INTO wallet_ledger (member_id, claim_id, code)
SELECT member_id, claim_id, code FROM codes WHERE claim_id = ANY(%b)
ON CONFLICT (claim_id, code) DO NOTHING
"""


def write_wallet(conn: Conn, claim_ids: Sequence[uuid.UUID]) -> int:
    """Write the wallet entries of the codes bound to ``claim_ids``, each at
    most once; returns how many were new."""
    return conn.execute(WRITE_WALLET, (list(claim_ids),)).rowcount


LOCK_BOUND = """
SELECT claim_id, requested_at FROM claims
 WHERE claim_id = ANY(%b) AND status = 'bound' ORDER BY claim_id FOR UPDATE
"""


def credit_claims(conn: Conn, claim_ids: Sequence[uuid.UUID]) -> tuple[int, list[tuple[uuid.UUID, datetime]]]:
    """Write the wallet entries of the bound claims among ``claim_ids`` (each
    at most once) and mark them credited. Returns the entries written and the
    (claim, requested at) of each claim this call credited."""
    bound = [(row[0], row[1]) for row in conn.execute(LOCK_BOUND, (list(claim_ids),))]
    if not bound:
        return 0, []
    ids = [claim_id for claim_id, _ in bound]
    written = write_wallet(conn, ids)
    conn.execute(
        "UPDATE claims SET status = 'credited', credited_at = now() WHERE claim_id = ANY(%b)", (ids,)
    )
    return written, bound


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
