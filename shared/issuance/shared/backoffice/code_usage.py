"""``issuance codes usage --activity SLUG``: one CSV line per code of an
activity that left the pool, and per paid use of its promo codes, with the
member, the claim's time and channel, the use's time, order and discount,
and a write-off's time and author. Its totals are the report's
(``issuance report``): the coupons claimed and used, and their discount.

COPY TO streams the rows, so memory stays constant whatever the activity's
size; read-only, export as often as needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
from issuance.shared.backoffice.catalog import BackOfficeError

COLUMNS = (
    "kind",
    "code",
    "template",
    "status",
    "member_id",
    "claimed_at",
    "channel",
    "used_at",
    "order_id",
    "discount_cents",
    "written_off_at",
    "written_off_by",
)

# Coupons: every code bound, used, expired, cancelled, voided or written off
# (a rebate coupon has no claim: no claim time or channel). Promo codes:
# each use paid for (a use given back by a refund is gone; a voided one
# keeps its line, status voided).
USAGE = """
COPY (
    SELECT 'coupon' AS kind, c.code, t.prefix AS template, c.status, c.member_id,
           k.requested_at AS claimed_at,
           CASE WHEN k.claim_id IS NOT NULL THEN coalesce(cc.channel, ch.name) END AS channel,
           c.used_at, c.order_id, c.discount_cents, w.written_off_at,
           w.channel || ':' || w.written_off_by AS written_off_by
      FROM coupon_templates t
      JOIN activities a ON a.activity_id = t.activity_id
      JOIN channels ch ON ch.channel_id = a.channel_id
      JOIN codes c ON c.template_id = t.template_id
      LEFT JOIN claims k ON k.claim_id = c.claim_id
      LEFT JOIN claim_channels cc ON cc.claim_id = c.claim_id
      LEFT JOIN code_writeoffs w ON w.code = c.code
     WHERE t.activity_id = {activity} AND c.status <> 'available'
    UNION ALL
    SELECT 'promo', p.code, t.prefix,
           CASE WHEN u.voided_at IS NULL THEN 'used' ELSE 'voided' END, u.member_id, NULL, NULL,
           u.redeemed_at, u.order_id, u.discount_cents, NULL, NULL
      FROM promo_uses u
      JOIN promo_codes p ON p.promo_id = u.promo_id
      JOIN coupon_templates t ON t.template_id = p.template_id
     WHERE t.activity_id = {activity} AND u.state = 'redeemed'
     ORDER BY 1, 2, 9
) TO STDOUT WITH (FORMAT csv, HEADER)
"""


def export_usage(conn: psycopg.Connection[Any], slug: str) -> Iterator[bytes]:
    """Stream an activity's per-code usage as CSV (see :data:`COLUMNS`)."""
    row = conn.execute("SELECT activity_id FROM activities WHERE slug = %s", (slug,)).fetchone()
    if row is None:
        raise BackOfficeError(f"no activity {slug!r}")
    # COPY takes no bound parameters; the activity ID is an int by type.
    with conn.cursor().copy(USAGE.format(activity=int(row[0]))) as copy:
        for data in copy:
            yield bytes(data)
