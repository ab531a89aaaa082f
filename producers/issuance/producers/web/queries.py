"""What the page reads from PostgreSQL: activities (cached briefly in the
process) and claim status. Read-only: the page never writes the database.

With cells (``ISSUANCE_CELLS``), :class:`CellQueries` reads an activity from
every cell at once, at most once per cache period, and sums the cells'
budgets and remaining packages; a claim's status is read in the one cell its
status token names."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Mapping
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
        return await read_activity(self.pool, slug)

    async def claim_status(self, claim_id: uuid.UUID, cell: int | None = None) -> ClaimState | None:
        """The claim's state (``cell``: the cell its token names; one pool here)."""
        return await read_claim_status(self.pool, claim_id)


class CellQueries(Queries):
    """The page's reads over cells: one pool per cell, by cell number.

    An activity is read from every cell concurrently (once per slug and cache
    period, however many requests ask), its texts from the first cell that
    has it, its budget and remaining packages summed: a member is told
    "sold out" only when every cell is. A cell that cannot be read counts
    with its last answer, or with nothing if it never answered; the page
    fails only when no cell answers."""

    def __init__(self, pools: Mapping[int, AsyncConnectionPool[Any]], *, cache_seconds: float) -> None:
        super().__init__(next(iter(pools.values())), cache_seconds=cache_seconds)
        self.pools = dict(pools)
        self._last: dict[tuple[str, int], ActivityPage | None] = {}

    async def _read_activity(self, slug: str) -> ActivityPage | None:
        numbers = list(self.pools)
        answers = await asyncio.gather(
            *(read_activity(self.pools[n], slug) for n in numbers), return_exceptions=True
        )
        if len(self._last) >= MAX_CACHED * len(numbers):
            self._last.clear()
        errors = [a for a in answers if isinstance(a, BaseException)]
        if len(errors) == len(numbers):
            raise errors[0]
        pages: list[ActivityPage] = []
        for number, answer in zip(numbers, answers, strict=True):
            if isinstance(answer, BaseException):
                page = self._last.get((slug, number))
            else:
                page = self._last[slug, number] = answer
            if page is not None:
                pages.append(page)
        if not pages:
            return None
        return dataclasses.replace(
            pages[0], budget=sum(p.budget for p in pages), remaining=sum(p.remaining for p in pages)
        )

    async def claim_status(self, claim_id: uuid.UUID, cell: int | None = None) -> ClaimState | None:
        """In the cell ``cell`` when the token names one of the map's cells;
        otherwise (a token made before the cell map) in each cell in turn."""
        if cell in self.pools:
            return await read_claim_status(self.pools[cell], claim_id)
        for pool in self.pools.values():
            found = await read_claim_status(pool, claim_id)
            if found is not None:
                return found
        return None


async def read_activity(pool: AsyncConnectionPool[Any], slug: str) -> ActivityPage | None:
    async with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cursor:
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


async def read_claim_status(pool: AsyncConnectionPool[Any], claim_id: uuid.UUID) -> ClaimState | None:
    async with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cursor:
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
