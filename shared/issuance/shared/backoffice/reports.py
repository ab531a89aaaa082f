"""``issuance report --activity SLUG``: what a campaign offered, cost and
brought, from PostgreSQL (the numbers of "What operators and SREs measure"
in the domain description)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from issuance.shared.db.store import Conn
from issuance.shared.errors import UnknownName
from psycopg.rows import class_row, dict_row


class UnknownActivity(UnknownName, ValueError):
    """The report names an activity that does not exist."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TemplateStock:
    prefix: str
    kind: str
    generated: int
    available: int
    issued: int
    used: int
    expired: int
    cancelled: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ActivityReport:
    slug: str
    title: str
    channel: str
    packages_offered: int
    packages_claimed: int
    packages_remaining: int
    collect_rate: float | None
    coupons_claimed: int
    coupons_used: int
    usage_rate: float | None
    total_discount_cents: int
    orders_with_coupon: int
    sales_with_coupon_cents: int
    cost_effectiveness: float | None
    average_order_with_coupon_cents: float | None
    new_members: int
    shares: int
    shares_opened: int
    claims_requested: int
    claims_refused: int
    claims_credited: int
    credits_held: int
    referrals: int
    referrals_reversed: int
    rebates_earned: int
    rebate_amount_cents: int
    rebate_coupons: int
    rebates_clawed_back: int
    rebates_for_review: int
    claims_last_24h: int
    days_until_exhausted: float | None
    templates: tuple[TemplateStock, ...]
    # Redeemed without an order, and shared promo codes (migration 0015):
    # the same totals as the per-code export (issuance codes usage).
    coupons_written_off: int = 0
    promo_uses: int = 0
    promo_discount_cents: int = 0

    def as_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["templates"] = [dataclasses.asdict(t) for t in self.templates]
        return data


ACTIVITY = """
SELECT a.activity_id, a.slug, a.title, ch.name AS channel, a.budget
  FROM activities a JOIN channels ch USING (channel_id)
 WHERE a.slug = %s
"""

CLAIMS = """
SELECT count(*) AS claims_requested,
       count(*) FILTER (WHERE status <> 'refused') AS packages_claimed,
       count(*) FILTER (WHERE status = 'refused') AS claims_refused,
       count(*) FILTER (WHERE status = 'credited') AS claims_credited,
       count(*) FILTER (WHERE status <> 'refused' AND new_member) AS new_members,
       count(*) FILTER (WHERE status <> 'refused' AND requested_at > now() - interval '24 hours')
           AS claims_last_24h
  FROM claims WHERE activity_slug = %s
"""

TEMPLATES = """
SELECT t.prefix, t.kind, count(c.code) AS generated,
       count(c.code) FILTER (WHERE c.status = 'available') AS available,
       count(c.code) FILTER (WHERE c.status IN ('unused', 'used', 'expired', 'voided')) AS issued,
       count(c.code) FILTER (WHERE c.status = 'used') AS used,
       count(c.code) FILTER (WHERE c.status = 'expired') AS expired,
       count(c.code) FILTER (WHERE c.status = 'cancelled') AS cancelled
  FROM coupon_templates t LEFT JOIN codes c USING (template_id)
 WHERE t.activity_id = %(activity_id)s
 GROUP BY t.template_id ORDER BY t.position
"""

# Coupons claimed in this activity's packages, and what their use brought:
# sales are paid orders not refunded (an unpaid order is no sale yet, a
# refunded one no longer is; issue 16 item 7).
USAGE = """
WITH claimed AS (
    SELECT c.code, c.status, c.order_id, c.discount_cents
      FROM codes c JOIN claims k USING (claim_id)
     WHERE k.activity_id = %(activity_id)s
), used_orders AS (
    SELECT DISTINCT o.order_id, o.amount_cents
      FROM claimed c JOIN orders o USING (order_id)
     WHERE c.status = 'used' AND o.status IN ('paid', 'fulfilled')
)
SELECT (SELECT count(*) FROM claimed) AS coupons_claimed,
       (SELECT count(*) FROM claimed WHERE status = 'used') AS coupons_used,
       (SELECT coalesce(sum(discount_cents), 0) FROM claimed WHERE status = 'used')::bigint
           AS total_discount_cents,
       (SELECT count(*) FROM used_orders) AS orders_with_coupon,
       (SELECT coalesce(sum(amount_cents), 0) FROM used_orders)::bigint AS sales_with_coupon_cents
"""

FUNNEL = """
SELECT (SELECT count(*) FROM shares WHERE activity_id = %(activity_id)s) AS shares,
       (SELECT count(*) FROM share_opens o JOIN shares s USING (share_id)
         WHERE s.activity_id = %(activity_id)s) AS shares_opened,
       (SELECT count(*) FROM held_credits h JOIN claims k USING (claim_id)
         WHERE k.activity_id = %(activity_id)s AND h.released_at IS NULL) AS credits_held,
       (SELECT count(*) FROM referrals WHERE activity_id = %(activity_id)s AND reversed_at IS NULL)
           AS referrals,
       (SELECT count(*) FROM referrals WHERE activity_id = %(activity_id)s AND reversed_at IS NOT NULL)
           AS referrals_reversed,
       (SELECT count(*) FROM rebates WHERE activity_id = %(activity_id)s AND reversed_at IS NULL)
           AS rebates_earned,
       (SELECT coalesce(sum(amount_cents), 0) FROM rebates
         WHERE activity_id = %(activity_id)s AND reversed_at IS NULL)::bigint AS rebate_amount_cents,
       (SELECT count(code) FROM rebates WHERE activity_id = %(activity_id)s AND reversed_at IS NULL)
           AS rebate_coupons,
       (SELECT count(*) FROM rebates WHERE activity_id = %(activity_id)s AND reversal = 'clawed_back')
           AS rebates_clawed_back,
       (SELECT count(*) FROM rebates WHERE activity_id = %(activity_id)s AND reversal = 'review')
           AS rebates_for_review
"""


# Paid promo code uses (a voided one stays spent), and codes written off.
WITHOUT_ORDER = """
SELECT (SELECT count(*) FROM codes c JOIN coupon_templates t USING (template_id)
         WHERE t.activity_id = %(activity_id)s AND c.status = 'written_off') AS coupons_written_off,
       count(u.use_id) AS promo_uses, coalesce(sum(u.discount_cents), 0)::bigint AS promo_discount_cents
  FROM promo_uses u JOIN promo_codes p USING (promo_id) JOIN coupon_templates t USING (template_id)
 WHERE t.activity_id = %(activity_id)s AND u.state = 'redeemed'
"""


def _ratio(numerator: float, denominator: float) -> float | None:
    return None if not denominator else round(numerator / denominator, 4)


def activity_report(conn: Conn, slug: str) -> ActivityReport:
    named = conn.cursor(row_factory=dict_row)
    activity = named.execute(ACTIVITY, (slug,)).fetchone()
    if activity is None:
        raise UnknownActivity(f"no activity {slug!r}")
    params = {"activity_id": activity["activity_id"]}
    # Every query yields one row, named after the report's fields.
    figures: dict[str, Any] = {
        **(named.execute(CLAIMS, (slug,)).fetchone() or {}),
        **(named.execute(USAGE, params).fetchone() or {}),
        **(named.execute(FUNNEL, params).fetchone() or {}),
        **(named.execute(WITHOUT_ORDER, params).fetchone() or {}),
    }
    templates = tuple(conn.cursor(row_factory=class_row(TemplateStock)).execute(TEMPLATES, params).fetchall())
    budget, claimed, last_day = activity["budget"], figures["packages_claimed"], figures["claims_last_24h"]
    remaining = budget - claimed
    discount, sales = figures["total_discount_cents"], figures["sales_with_coupon_cents"]
    # At the last day's claim rate, when do the packages or a template's pool run out?
    stock = min([remaining, *(t.available for t in templates)])
    return ActivityReport(
        slug=activity["slug"],
        title=activity["title"],
        channel=activity["channel"],
        packages_offered=budget,
        packages_remaining=remaining,
        collect_rate=_ratio(claimed, budget),
        usage_rate=_ratio(figures["coupons_used"], figures["coupons_claimed"]),
        cost_effectiveness=_ratio(sales, discount),
        average_order_with_coupon_cents=_ratio(sales, figures["orders_with_coupon"]),
        days_until_exhausted=None if not last_day else round(stock / last_day, 2),
        templates=templates,
        **figures,
    )


def _money(cents: float | None) -> str:
    return "-" if cents is None else f"{cents / 100:,.2f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def render_table(report: ActivityReport) -> str:
    """The report as aligned text."""
    r = report
    lines = [
        ("activity", f"{r.slug} ({r.title}) on {r.channel}"),
        (
            "packages offered / claimed / remaining",
            f"{r.packages_offered} / {r.packages_claimed} / {r.packages_remaining}",
        ),
        ("collect rate", _rate(r.collect_rate)),
        ("coupons claimed / used", f"{r.coupons_claimed} / {r.coupons_used}"),
        ("usage rate", _rate(r.usage_rate)),
        ("total discount", _money(r.total_discount_cents)),
        ("orders with a coupon", str(r.orders_with_coupon)),
        (
            "written off / promo code uses (discount)",
            f"{r.coupons_written_off} / {r.promo_uses} ({_money(r.promo_discount_cents)})",
        ),
        ("sales with a coupon", _money(r.sales_with_coupon_cents)),
        (
            "cost effectiveness (sales / discount)",
            "-" if r.cost_effectiveness is None else f"{r.cost_effectiveness:.2f}",
        ),
        ("average order with a coupon", _money(r.average_order_with_coupon_cents)),
        ("new members", str(r.new_members)),
        (
            "funnel: shares opened -> claims -> credited",
            f"{r.shares_opened} -> {r.claims_requested} -> {r.claims_credited}"
            f" ({r.claims_refused} refused, {r.credits_held} held until registration)",
        ),
        ("referrals / rebates earned", f"{r.referrals} / {r.rebates_earned}"),
        ("rebates paid", f"{_money(r.rebate_amount_cents)} and {r.rebate_coupons} coupons"),
        (
            "refunds: referrals reversed / rebates clawed back / for review",
            f"{r.referrals_reversed} / {r.rebates_clawed_back} / {r.rebates_for_review}",
        ),
        (
            "claims in the last 24 h / days until exhausted",
            f"{r.claims_last_24h} / {'-' if r.days_until_exhausted is None else r.days_until_exhausted}",
        ),
    ]
    width = max(len(k) for k, _ in lines)
    out = [f"{k.ljust(width)}  {v}" for k, v in lines]
    out.append("")
    out.append(
        f"{'template':8}  {'kind':13}  {'generated':>9}  {'available':>9}  {'issued':>7}  {'used':>6}"
        f"  {'expired':>7}  {'cancelled':>9}"
    )
    for t in r.templates:
        out.append(
            f"{t.prefix:8}  {t.kind:13}  {t.generated:>9}  {t.available:>9}  {t.issued:>7}  {t.used:>6}"
            f"  {t.expired:>7}  {t.cancelled:>9}"
        )
    return "\n".join(out)


CHANNEL_ACTIVITIES = """
SELECT a.slug FROM activities a JOIN channels ch USING (channel_id)
 WHERE ch.name = %s ORDER BY a.created_at, a.activity_id
"""
_SUMMED = (
    "packages_offered",
    "packages_claimed",
    "packages_remaining",
    "coupons_claimed",
    "coupons_used",
    "total_discount_cents",
    "orders_with_coupon",
    "sales_with_coupon_cents",
    "new_members",
    "shares",
    "shares_opened",
    "claims_requested",
    "claims_refused",
    "claims_credited",
    "credits_held",
    "referrals",
    "referrals_reversed",
    "rebates_earned",
    "rebate_amount_cents",
    "rebate_coupons",
    "rebates_clawed_back",
    "rebates_for_review",
    "claims_last_24h",
    "coupons_written_off",
    "promo_uses",
    "promo_discount_cents",
)


def channel_report(conn: Conn, channel: str) -> ActivityReport:
    """The same figures over every activity of a channel."""
    reports = [
        activity_report(conn, slug) for (slug,) in conn.execute(CHANNEL_ACTIVITIES, (channel,)).fetchall()
    ]
    if not reports:
        raise UnknownActivity(f"no activity on channel {channel!r}")
    return summed(
        reports,
        slug=f"channel:{channel}",
        title=f"{len(reports)} activities",
        channel=channel,
        templates=tuple(t for r in reports for t in r.templates),
    )


def summed(
    reports: Sequence[ActivityReport],
    *,
    slug: str,
    title: str,
    channel: str,
    templates: tuple[TemplateStock, ...],
) -> ActivityReport:
    """Several reports as one: counts summed, rates of the sums (a channel's
    activities; an activity's cells)."""
    totals = {name: sum(getattr(r, name) for r in reports) for name in _SUMMED}
    stock = min([totals["packages_remaining"], *(t.available for t in templates)])
    return ActivityReport(
        slug=slug,
        title=title,
        channel=channel,
        collect_rate=_ratio(totals["packages_claimed"], totals["packages_offered"]),
        usage_rate=_ratio(totals["coupons_used"], totals["coupons_claimed"]),
        cost_effectiveness=_ratio(totals["sales_with_coupon_cents"], totals["total_discount_cents"]),
        average_order_with_coupon_cents=_ratio(
            totals["sales_with_coupon_cents"], totals["orders_with_coupon"]
        ),
        days_until_exhausted=None
        if not totals["claims_last_24h"]
        else round(stock / totals["claims_last_24h"], 2),
        templates=templates,
        **totals,
    )
