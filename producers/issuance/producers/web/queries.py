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
from psycopg.rows import kwargs_row
from psycopg_pool import AsyncConnectionPool

MAX_CACHED = 1000

ACTIVITY_PAGE = """
SELECT a.slug, a.title, a.banner_url, a.copy, a.rules AS rules_text, a.brand, a.starts_at, a.ends_at,
       a.online, a.timezone, a.exclusivity_group, a.budget,
       a.budget - (SELECT count(*) FROM claims c
                    WHERE c.activity_id = a.activity_id AND c.status <> 'refused') AS remaining
  FROM activities a
 WHERE a.slug = %s
"""

CLAIM_STATUS = """
SELECT c.status, c.reason,
       coalesce((SELECT json_agg(json_build_object('code', k.code, 'expires_at', k.expires_at)
                                 ORDER BY k.code)
                   FROM codes k WHERE k.claim_id = c.claim_id), '[]'::json) AS coupons
  FROM claims c
 WHERE c.claim_id = %s
"""


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

    @classmethod
    def from_row(
        cls, *, online: bool, starts_at: datetime, ends_at: datetime, remaining: int, **columns: Any
    ) -> ActivityPage:
        rules = ActivityRules(online=online, starts_at=starts_at, ends_at=ends_at)
        return cls(rules=rules, remaining=int(remaining), **columns)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ClaimState:
    """A claim as the page reports it, with its coupons once bound."""

    status: ClaimStatus
    reason: Refusal | None
    coupons: tuple[dict[str, Any], ...]

    @classmethod
    def from_row(cls, *, status: str, reason: str | None, coupons: list[dict[str, Any]]) -> ClaimState:
        return cls(
            status=ClaimStatus(status),
            reason=None if reason is None else Refusal(reason),
            coupons=tuple(coupons),
        )


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
        async with self.pool.connection() as conn:
            cursor = conn.cursor(row_factory=kwargs_row(ActivityPage.from_row))
            await cursor.execute(ACTIVITY_PAGE, (slug,))
            page: ActivityPage | None = await cursor.fetchone()
        return page

    async def claim_status(self, claim_id: uuid.UUID) -> ClaimState | None:
        async with self.pool.connection() as conn:
            cursor = conn.cursor(row_factory=kwargs_row(ClaimState.from_row))
            await cursor.execute(CLAIM_STATUS, (claim_id,))
            state: ClaimState | None = await cursor.fetchone()
        return state
