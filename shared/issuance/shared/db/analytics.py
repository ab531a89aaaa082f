"""Read-only SQL for the exporter, the sweeper and the charts: the promise
(claims bound but not credited, against their deadlines) and per-campaign
figures. Every function takes ``now`` explicitly, so a test or an operator's
what-if can look at the future without waiting for it.

The queries are sized so that a 10-million-code pool costs nothing: the
uncredited claims come from the partial index over bound claims, codes per
template from the batch sizes minus the partial index over taken codes; only
the claims of recent activities are read.
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import datetime, timedelta
from typing import Any

from psycopg import Connection
from psycopg.rows import class_row, dict_row

Conn = Connection[Any]

# Campaigns stay in the figures this long after they end (credits and late
# usage still move).
REPORT_HORIZON = timedelta(days=2)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PromiseSnapshot:
    """The uncredited claims against the 24-hour promise at ``now``."""

    now: datetime
    uncredited: int
    oldest_requested_at: datetime | None
    earliest_deadline: datetime | None
    overdue: int
    at_risk_1h: int
    at_risk_6h: int
    held: int = 0  # bound, waiting for the member to register
    credited_recent: int = 0  # claims credited in the window before now
    window_seconds: float = 900.0

    @property
    def credit_rate(self) -> float:
        """Claims credited per second over the window before ``now``."""
        return self.credited_recent / self.window_seconds

    @property
    def oldest_age_seconds(self) -> float:
        if self.oldest_requested_at is None:
            return 0.0
        return max((self.now - self.oldest_requested_at).total_seconds(), 0.0)

    @property
    def headroom_seconds(self) -> float:
        """Time left before the earliest deadline of an uncredited claim
        (negative once it has passed; +Inf with nothing uncredited)."""
        if self.earliest_deadline is None:
            return float("inf")
        return (self.earliest_deadline - self.now).total_seconds()


# A claim whose credit is held until its member registers is not under the
# promise yet (its deadline is set when the hold is released).
NOT_HELD = """NOT EXISTS (SELECT 1 FROM held_credits h
                   WHERE h.claim_id = claims.claim_id AND h.released_at IS NULL)"""

PROMISE = f"""
SELECT count(*) AS uncredited,
       min(requested_at) AS oldest_requested_at,
       min(deadline) AS earliest_deadline,
       count(*) FILTER (WHERE deadline <= %(now)s) AS overdue,
       count(*) FILTER (WHERE deadline > %(now)s AND deadline <= %(now)s + interval '1 hour') AS at_risk_1h,
       count(*) FILTER (WHERE deadline > %(now)s AND deadline <= %(now)s + interval '6 hours') AS at_risk_6h,
       (SELECT count(*) FROM held_credits WHERE released_at IS NULL) AS held,
       (SELECT count(*) FROM claims
         WHERE status = 'credited' AND credited_at > %(now)s - %(window)s AND credited_at <= %(now)s)
           AS credited_recent
  FROM claims
 WHERE status = 'bound' AND {NOT_HELD}
"""


def promise_snapshot(conn: Conn, now: datetime, window: timedelta = timedelta(minutes=15)) -> PromiseSnapshot:
    """The promise at ``now``; the credit rate over the ``window`` before it
    (from the partial index over credited claims: recent rows only)."""
    row = conn.cursor(row_factory=dict_row).execute(PROMISE, {"now": now, "window": window}).fetchone()
    assert row is not None
    return PromiseSnapshot(now=now, window_seconds=window.total_seconds(), **row)


# The partial index over bound claims is in deadline order: the oldest first.
OVERDUE_FOR_CREDIT = f"""
SELECT claim_id
  FROM claims
 WHERE status = 'bound' AND decided_at <= %(cutoff)s AND {NOT_HELD}
 ORDER BY deadline
 LIMIT %(limit)s
"""


def bound_not_credited(conn: Conn, *, now: datetime, grace: timedelta, limit: int) -> list[uuid.UUID]:
    """Claims bound at least ``grace`` ago and still not credited, by deadline."""
    rows = conn.execute(OVERDUE_FOR_CREDIT, {"cutoff": now - grace, "limit": limit}).fetchall()
    return [row[0] for row in rows]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ActivityFigures:
    slug: str
    budget: int
    claims: int  # requested and decided (granted + refused)
    granted: int
    credited: int
    uncredited: int
    refused: int
    new_members: int
    via_share: int
    breaches: int  # credited late, or still uncredited past the deadline
    shares: int
    shares_opened: int


ACTIVITIES = """
SELECT a.activity_id, a.slug, a.budget,
       count(c.claim_id) AS claims,
       count(c.claim_id) FILTER (WHERE c.status <> 'refused') AS granted,
       count(c.claim_id) FILTER (WHERE c.status = 'credited') AS credited,
       count(c.claim_id) FILTER (WHERE c.status = 'bound') AS uncredited,
       count(c.claim_id) FILTER (WHERE c.status = 'refused') AS refused,
       count(c.claim_id) FILTER (WHERE c.status <> 'refused' AND c.new_member) AS new_members,
       count(c.claim_id) FILTER (WHERE c.status <> 'refused' AND c.share_id IS NOT NULL) AS via_share,
       count(c.claim_id) FILTER (WHERE (c.status = 'credited' AND c.credited_at > c.deadline)
                                    OR (c.status = 'bound' AND c.deadline <= %(now)s
                                        AND NOT EXISTS (SELECT 1 FROM held_credits h
                                                         WHERE h.claim_id = c.claim_id
                                                           AND h.released_at IS NULL))) AS breaches
  FROM activities a
  LEFT JOIN claims c ON c.activity_id = a.activity_id
 WHERE a.ends_at > %(since)s AND a.starts_at <= %(now)s
 GROUP BY a.activity_id
 ORDER BY a.slug
"""

SHARES = """
SELECT s.activity_id, count(DISTINCT s.share_id), count(o.event_id)
  FROM shares s
  LEFT JOIN share_opens o ON o.share_id = s.share_id
 WHERE s.activity_id = ANY(%(ids)s)
 GROUP BY s.activity_id
"""


def activity_figures(conn: Conn, now: datetime, horizon: timedelta = REPORT_HORIZON) -> list[ActivityFigures]:
    """Figures of every activity running at ``now`` or ended within ``horizon``."""
    named = conn.cursor(row_factory=dict_row)
    rows = named.execute(ACTIVITIES, {"now": now, "since": now - horizon}).fetchall()
    ids = [row["activity_id"] for row in rows]
    shares = {r[0]: (int(r[1]), int(r[2])) for r in conn.execute(SHARES, {"ids": ids}).fetchall()}
    figures = []
    for row in rows:
        count, opened = shares.get(row.pop("activity_id"), (0, 0))
        figures.append(ActivityFigures(shares=count, shares_opened=opened, **row))
    return figures


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TemplateFigures:
    activity: str
    prefix: str
    generated: int
    taken: int  # bound to a member, used, expired or cancelled
    used: int

    @property
    def available(self) -> int:
        return max(self.generated - self.taken, 0)


TEMPLATES = """
SELECT a.slug AS activity, t.prefix,
       coalesce((SELECT sum(b.size) FROM code_batches b WHERE b.template_id = t.template_id), 0) AS generated,
       coalesce(k.taken, 0) AS taken, coalesce(k.used, 0) AS used
  FROM activities a
  JOIN coupon_templates t ON t.activity_id = a.activity_id
  LEFT JOIN (SELECT template_id, count(*) AS taken, count(*) FILTER (WHERE status = 'used') AS used
               FROM codes
              WHERE status <> 'available'
                AND template_id IN (SELECT template_id FROM coupon_templates t2
                                      JOIN activities a2 ON a2.activity_id = t2.activity_id
                                     WHERE a2.ends_at > %(since)s AND a2.starts_at <= %(now)s)
              GROUP BY template_id) k ON k.template_id = t.template_id
 WHERE a.ends_at > %(since)s AND a.starts_at <= %(now)s
 ORDER BY a.slug, t.position
"""


def template_figures(conn: Conn, now: datetime, horizon: timedelta = REPORT_HORIZON) -> list[TemplateFigures]:
    """Codes per template of the reported activities: generated (the batch
    sizes) minus taken (the partial index over non-available codes)."""
    cursor = conn.cursor(row_factory=class_row(TemplateFigures))
    return cursor.execute(TEMPLATES, {"now": now, "since": now - horizon}).fetchall()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class UsageFigures:
    """Paid orders that used the activity's coupons and were not refunded
    (an unpaid order is no sale yet; cancelled ones give their coupons back)."""

    slug: str
    orders: int
    discount_cents: int
    sales_cents: int


USAGE = """
WITH used AS (
    SELECT t.activity_id, c.order_id, sum(c.discount_cents) AS discount
      FROM codes c
      JOIN coupon_templates t ON t.template_id = c.template_id
     WHERE c.status = 'used' AND t.activity_id = ANY(%(ids)s)
     GROUP BY t.activity_id, c.order_id
)
SELECT a.slug, count(o.order_id) AS orders, coalesce(sum(u.discount), 0)::bigint AS discount_cents,
       coalesce(sum(o.amount_cents), 0)::bigint AS sales_cents
  FROM used u
  JOIN activities a ON a.activity_id = u.activity_id
  JOIN orders o ON o.order_id = u.order_id AND o.status IN ('paid', 'fulfilled')
 GROUP BY a.slug
"""


def usage_figures(conn: Conn, now: datetime, horizon: timedelta = REPORT_HORIZON) -> list[UsageFigures]:
    """Coupon orders, discount and sales per reported activity (the used
    codes are found through the partial index over taken codes)."""
    ids = [
        row[0]
        for row in conn.execute(
            "SELECT activity_id FROM activities WHERE ends_at > %(since)s AND starts_at <= %(now)s",
            {"now": now, "since": now - horizon},
        )
    ]
    return conn.cursor(row_factory=class_row(UsageFigures)).execute(USAGE, {"ids": ids}).fetchall()
