"""What the page reads from PostgreSQL: activities (cached briefly in the
process) and claim status. Read-only: the page never writes the database."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from datetime import datetime
from typing import Any

from issuance.shared.domain import ActivityRules, Refusal
from issuance.shared.domain.claims import ClaimStatus
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

MAX_CACHED = 1000

ACTIVITY_PAGE = """
SELECT a.slug, a.title, a.banner_url, a.copy, a.rules, a.brand, a.starts_at, a.ends_at, a.online,
       a.timezone, a.exclusivity_group, a.budget,
       a.budget - (SELECT count(*) FROM claims c
                    WHERE c.activity_id = a.activity_id AND c.status <> 'refused') AS remaining,
       a.validity_days, a.valid_until, a.hold_until_registered, a.regions,
       coalesce((SELECT json_agg(json_build_object('title', t.title, 'kind', t.kind, 'value', t.value,
                                                   'threshold_cents', t.threshold_cents)
                                 ORDER BY t.position)
                   FROM coupon_templates t WHERE t.activity_id = a.activity_id), '[]'::json) AS templates
  FROM activities a
 WHERE a.slug = %s
"""

CLAIM_STATUS = """
SELECT c.status, c.reason,
       coalesce((SELECT json_agg(json_build_object('code', k.code, 'expires_at', k.expires_at,
                                                   'title', t.title, 'kind', t.kind, 'value', t.value,
                                                   'threshold_cents', t.threshold_cents)
                                 ORDER BY t.position, k.code)
                   FROM codes k JOIN coupon_templates t ON t.template_id = k.template_id
                  WHERE k.claim_id = c.claim_id), '[]'::json) AS coupons,
       -- Held until the member registers (the activity's choice): the page asks them to.
       EXISTS (SELECT 1 FROM held_credits h
                WHERE h.claim_id = c.claim_id AND h.released_at IS NULL) AS held
  FROM claims c
 WHERE c.claim_id = %s
"""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CouponFace:
    """What a coupon of a template promises, as its card shows it."""

    title: str
    kind: str  # discount_rate (basis points off), amount_off or gift (minor units)
    value: int
    threshold_cents: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CouponFace:
        return cls(
            title=data["title"],
            kind=data["kind"],
            value=int(data["value"]),
            threshold_cents=int(data["threshold_cents"]),
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ActivityPage:
    slug: str
    title: str
    banner_url: str
    copy: str
    rules_text: str
    brand: str
    rules: ActivityRules
    timezone: str
    exclusivity_group: str
    budget: int
    remaining: int  # packages not yet granted, as of the last read
    templates: tuple[CouponFace, ...] = ()
    validity_days: int | None = None
    valid_until: datetime | None = None
    hold_until_registered: bool = False
    regions: tuple[str, ...] = ()  # the cities or provinces it is limited to


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ClaimState:
    """A claim as the page reports it, with its coupons once bound."""

    status: ClaimStatus
    reason: Refusal | None
    coupons: tuple[dict[str, Any], ...]
    held: bool = False


class Queries:
    def __init__(self, pool: AsyncConnectionPool[Any], *, cache_seconds: float) -> None:
        self.pool = pool
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, ActivityPage | None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def activity(self, slug: str) -> ActivityPage | None:
        """The activity, at most ``cache_seconds`` old. When PostgreSQL cannot
        be read, a stale copy is better than no page; with none, it raises."""
        cached = self._cache.get(slug)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        lock = self._locks.setdefault(slug, asyncio.Lock())
        async with lock:  # one read per slug, however many requests wait for it
            cached = self._cache.get(slug)
            if cached is not None and cached[0] > time.monotonic():
                return cached[1]
            try:
                page = await self._read_activity(slug)
            except Exception:
                if cached is not None:
                    return cached[1]
                raise
            if len(self._cache) >= MAX_CACHED:  # slugs come from URLs: bound the cache
                self._cache.clear()
                self._locks = {slug: lock}
            self._cache[slug] = (time.monotonic() + self.cache_seconds, page)
            return page

    async def _read_activity(self, slug: str) -> ActivityPage | None:
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cursor:
            await cursor.execute(ACTIVITY_PAGE, (slug,))
            row = await cursor.fetchone()
        if row is None:
            return None
        return ActivityPage(
            slug=row["slug"],
            title=row["title"],
            banner_url=row["banner_url"],
            copy=row["copy"],
            rules_text=row["rules"],
            brand=row["brand"],
            rules=ActivityRules(online=row["online"], starts_at=row["starts_at"], ends_at=row["ends_at"]),
            timezone=row["timezone"],
            exclusivity_group=row["exclusivity_group"],
            budget=row["budget"],
            remaining=int(row["remaining"]),
            templates=tuple(CouponFace.from_json(t) for t in row["templates"]),
            validity_days=row["validity_days"],
            valid_until=row["valid_until"],
            hold_until_registered=row["hold_until_registered"],
            regions=tuple(row["regions"]),
        )

    async def claim_status(self, claim_id: uuid.UUID) -> ClaimState | None:
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cursor:
            await cursor.execute(CLAIM_STATUS, (claim_id,))
            row = await cursor.fetchone()
        if row is None:
            return None
        return ClaimState(
            status=ClaimStatus(row["status"]),
            reason=None if row["reason"] is None else Refusal(row["reason"]),
            coupons=tuple(row["coupons"]),
            held=row["held"],
        )
