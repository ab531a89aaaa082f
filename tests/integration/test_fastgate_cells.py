"""The page's fast gate over cells whose Redis differ: a number is looked up
in the grant sets of its own cell's Redis, where that cell's workers write
them (issuance.shared.gate.remember_grants), while the rate counters, the
budget counter and the accepted markers stay in the page's Redis.

Two Redis databases on the real Redis stand for the two cells' servers. The
keys are the test's own (a fresh activity and group), deleted at the end:
nothing else in either database is touched."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import redis
from issuance.producers.web.fastgate import FastGate, Limits, Verdict, budget_key
from issuance.shared import gate
from issuance.shared.cellmap import load_cell_map
from issuance.shared.domain import phone_digest
from issuance.shared.domain.cells import CellMap
from issuance.shared.settings import PREFIX, Settings, settings_from

KEY = "test-phone-key-0123456789abcdef"
OLD_KEY = "an-older-phone-key-0123456789ab"
LIMITS = Limits(per_ip=100, per_network=100, per_phone=100, per_share=0, window_seconds=60)


def other_db(url: str) -> str:
    """The same Redis, another database number than ``url``'s."""
    parts = urlsplit(url)
    number = int(parts.path.strip("/") or 0)
    return parts._replace(path=f"/{number % 15 + 1}").geturl()


@pytest.fixture
def cells(settings: Settings) -> Iterator[tuple[CellMap, dict[int, redis.Redis]]]:
    """Cell a keeps its grants in the page's Redis, cell b in another."""
    urls = {0: settings.redis_url, 1: other_db(settings.redis_url)}
    entries = [
        {"name": name, "number": n, "database_url": "postgresql://unused/x", "amqp_url": "amqp://unused/x"}
        | {"redis_url": urls[n]}
        for n, name in enumerate("ab")
    ]
    cell_map = load_cell_map(settings_from({f"{PREFIX}CELLS": json.dumps(entries)}))
    clients = {n: redis.Redis.from_url(url) for n, url in urls.items()}
    yield cell_map, clients
    for client in clients.values():
        client.close()


def numbers(cell_map: CellMap) -> dict[int, str]:
    """A number of each cell."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < 2:
        phone = f"+86137{n:08d}"
        found.setdefault(cell_map.cell_for_phone(phone).number, phone)
        n += 1
    return found


def test_a_number_is_looked_up_in_its_own_cells_redis(
    cells: tuple[CellMap, dict[int, redis.Redis]], settings: Settings
) -> None:
    cell_map, clients = cells
    slug, twin, third, group = (f"fgc-{uuid.uuid4().hex[:8]}" for _ in range(4))
    phones = numbers(cell_map)
    digest = {n: phone_digest(phone, KEY) for n, phone in phones.items()}
    old = phone_digest(phones[1], OLD_KEY)
    # Each cell's workers, after their commit, in their own cell's Redis.
    gate.remember_grants(clients[1], [(slug, group, digest[1]), (twin, f"{group}-old", old)])
    gate.remember_grants(clients[0], [(twin, group, digest[0])])
    # Cell a's number in cell b's Redis (as no worker would write it): not looked at.
    gate.remember_grants(clients[1], [(third, f"{group}-third", digest[0])])
    urls = {c.number: c.redis_url for c in cell_map.cells}
    checks = {
        # Before: the page read only its own Redis and let these through ("ok").
        "b, the activity it holds": (slug, group, digest[1], (), 1),
        "b, a similar activity": (twin, group, digest[1], (), 1),
        "b, under an older key": (twin, f"{group}-old", phone_digest("+8613799999999", KEY), (old,), 1),
        # Cell a's grants are in the page's own Redis: the script looks them up.
        "a, the activity it holds": (twin, group, digest[0], (), 0),
        "a, a similar activity": (slug, group, digest[0], (), 0),
        "a, in cell b's Redis": (third, f"{group}-third", digest[0], (), 0),
    }
    try:
        verdicts = asyncio.run(check_all(settings.redis_url, urls, checks))
        down = asyncio.run(unreachable_cell(settings.redis_url, slug, group, digest[1]))
        budgets = [bool(clients[n].exists(budget_key(third))) for n in (0, 1)]
    finally:
        for client in clients.values():
            client.delete(*(gate.activity_key(s) for s in (slug, twin, third)))
            client.delete(*(gate.group_key(g) for g in (group, f"{group}-old", f"{group}-third")))
            client.delete(*(budget_key(s) for s in (slug, twin, third)))
    assert verdicts == {
        "b, the activity it holds": Verdict.ALREADY_RECEIVED,
        "b, a similar activity": Verdict.SIMILAR_ACTIVITY,
        "b, under an older key": Verdict.ALREADY_RECEIVED,
        "a, the activity it holds": Verdict.ALREADY_RECEIVED,
        "a, a similar activity": Verdict.SIMILAR_ACTIVITY,
        "a, in cell b's Redis": Verdict.OK,
    }, verdicts
    # A cell whose Redis is down: its numbers are left to its workers, at once.
    assert down == (Verdict.OK, True)
    # The budget counters are the page's: none in cell b's Redis.
    assert budgets == [True, False]


Check = tuple[str, str, bytes, tuple[bytes, ...], int]


async def check_all(page_url: str, urls: dict[int, str], checks: dict[str, Check]) -> dict[str, Verdict]:
    """Every check at once: one batch, both cells' lookups in it."""
    fast = FastGate(page_url, limits=LIMITS, cell_urls=urls)
    try:
        answers = await asyncio.gather(
            *(
                fast.check_claim(
                    client_ip="198.51.100.7",
                    activity=activity,
                    group=group,
                    digest=digest,
                    claim_id=uuid.uuid4(),
                    remaining=10,
                    older_digests=older,
                    cell=cell,
                )
                for activity, group, digest, older, cell in checks.values()
            )
        )
    finally:
        await fast.close()
    return dict(zip(checks, answers, strict=True))


async def unreachable_cell(page_url: str, slug: str, group: str, digest: bytes) -> tuple[Verdict, bool]:
    loop = asyncio.get_running_loop()
    fast = FastGate(page_url, limits=LIMITS, cell_urls={1: "redis://127.0.0.1:1/0"}, timeout=0.3)
    try:
        started = loop.time()
        verdict = await fast.check_claim(
            client_ip="198.51.100.8",
            activity=slug,
            group=group,
            digest=digest,
            claim_id=uuid.uuid4(),
            remaining=10,
            cell=1,
        )
        return verdict, loop.time() - started < 2
    finally:
        await fast.close()
