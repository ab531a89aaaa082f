"""The page's reads over cells without a database: what it answers when a
cell cannot be read (CellQueries with the per-cell read replaced)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from issuance.producers.web import queries
from issuance.producers.web.queries import ActivityPage, CellQueries
from issuance.shared.domain import ActivityRules


def page(budget: int, remaining: int, title: str = "Cells") -> ActivityPage:
    now = datetime.now(UTC)
    return ActivityPage(
        slug="cells",
        title=title,
        banner_url="",
        copy="",
        rules_text="",
        brand="",
        rules=ActivityRules(online=True, starts_at=now, ends_at=now),
        timezone="Asia/Shanghai",
        exclusivity_group="",
        budget=budget,
        remaining=remaining,
    )


def test_a_cell_that_cannot_be_read_counts_with_its_last_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    answers: dict[str, Any] = {"a": page(2, 1, "from a"), "b": page(3, 3, "from b"), "c": None}

    async def read(pool: Any, slug: str) -> ActivityPage | None:
        answer = answers[pool]
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[no-any-return]

    monkeypatch.setattr(queries, "read_activity", read)
    cells = CellQueries({0: "a", 1: "b", 2: "c"}, cache_seconds=0)  # type: ignore[dict-item]

    first = asyncio.run(cells.activity("cells"))
    # Texts from the first cell, packages summed; a cell without the activity adds nothing.
    assert first is not None and (first.title, first.budget, first.remaining) == ("from a", 5, 4)
    answers["b"] = OSError("cell b is down")
    answers["a"] = page(2, 0, "from a")
    second = asyncio.run(cells.activity("cells"))
    assert second is not None and (second.budget, second.remaining) == (5, 3)
    answers.update(a=OSError("down"), c=OSError("down"))
    # No cell answers: the base class's stale copy, as with one database.
    assert asyncio.run(cells.activity("cells")) == second
    fresh = CellQueries({0: "a", 2: "c"}, cache_seconds=0)  # type: ignore[dict-item]
    with pytest.raises(OSError, match="down"):
        asyncio.run(fresh.activity("cells"))
