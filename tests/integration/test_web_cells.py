"""The activity page over two cells on the real services: two databases and
vhosts, real workers per cell, one page with the cell map. The page counts
the packages of every cell (it answers "sold out" only when all are gone) and
reads each claim's status in the cell its number routes to."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from issuance.producers.web.security import status_key, status_token
from issuance.shared import gate
from issuance.shared.cellmap import load_cell_map
from issuance.shared.cli import build_parser
from issuance.shared.domain import phone_digest
from issuance.shared.settings import PREFIX, Settings, settings_from

from tests.conftest import cell_map, private_services
from tests.e2e.conftest import Workers, consumers, wait_for
from tests.integration.test_fastgate_cells import other_db
from tests.integration.web_pipeline import page_client, post_claim, read_status, settle

PHONE_KEY = "test-phone-key-0123456789abcdef"
ACTIVITY = """
slug: {slug}
title: Page over cells
channel: web-cells
starts_at: 2020-01-01T00:00:00+00:00
ends_at: 2099-01-01T00:00:00+00:00
budget: 4
validity_days: 7
templates:
  - {{prefix: WCA, kind: amount_off, value: 500}}
"""


@pytest.fixture(scope="module")
def two_cells() -> Iterator[list[dict[str, str]]]:
    with private_services() as a, private_services() as b_env:
        # Two Redis databases: each cell's workers write their grants to their own.
        b = {**b_env, f"{PREFIX}REDIS_URL": other_db(a[f"{PREFIX}REDIS_URL"])}
        yield [a, b]


def issuance(settings: Settings, *argv: str) -> str:
    args = build_parser().parse_args(list(argv))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert int(args.func(args, settings)) == 0, out.getvalue()
    return out.getvalue()


def claims_in(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM claims").fetchone()
    assert row is not None
    return int(row[0])


def dead_letters(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM dead_letters").fetchone()
    assert row is not None
    return int(row[0])


def phones_by_cell(settings: Settings, count: int) -> dict[int, list[str]]:
    cells = load_cell_map(settings)
    found: dict[int, list[str]] = {0: [], 1: []}
    n = 0
    while min(len(v) for v in found.values()) < count:
        phone = f"+86138{n:08d}"
        found[cells.cell_for_phone(phone).number].append(phone)
        n += 1
    return {number: phones[:count] for number, phones in found.items()}


def test_page_sells_every_cell_and_reads_status_in_the_claims_cell(
    two_cells: list[dict[str, str]], tmp_path: Path
) -> None:
    envs = two_cells
    operator = settings_from({**envs[0], f"{PREFIX}CELLS": cell_map(envs)})
    issuance(operator, "cells", "init")
    issuance(operator, "cells", "each", "--", "channel", "create", "web-cells")
    slug = f"wc-{uuid.uuid4().hex[:6]}"
    spec = tmp_path / "activity.yaml"
    spec.write_text(ACTIVITY.format(slug=slug))
    issuance(operator, "cells", "each", "--", "activity", "create", "--file", str(spec))
    # Four packages, two in each cell.
    issuance(operator, "cells", "split", slug, "--budget", "4", "--codes", "WCA=4")
    phones = phones_by_cell(operator, 3)

    log = tmp_path / "workers.log"
    workers = []
    try:
        for name, env in zip("ab", envs, strict=True):
            # Each cell's workers know their cell: a misrouted claim would be dead-lettered.
            cell = {f"{PREFIX}CELLS": cell_map(envs), f"{PREFIX}CELL": name}
            worker_env = {**os.environ, **env, **cell, "ISSUANCE_TEST_LOG": str(log)}
            worker_env.pop("PYTEST_CURRENT_TEST", None)
            workers.append(Workers(worker_env, 1, 2, None))
        for env in envs:
            wait_for(lambda env=env: consumers(settings_from(env), "claims") >= 1, 60, "workers to consume")
        # The page of cell a's deployment, with the map; no activity cache.
        page = dataclasses.replace(operator, web_cache_seconds=0)
        with page_client(page) as client:
            run_the_page(client, slug, phones, envs)
    finally:
        for worker in workers:
            worker.stop()
    report_over_cells(operator, slug)


def report_over_cells(operator: Settings, slug: str) -> None:
    """``issuance report`` sums the cells; ``--by-cell`` shows each one's share."""
    total = json.loads(issuance(operator, "report", "--activity", slug, "--json"))
    # Before: cell a's database alone, two packages offered.
    assert (total["packages_offered"], total["packages_claimed"], total["packages_remaining"]) == (4, 4, 0)
    assert total["claims_credited"] == 4 and total["collect_rate"] == 1.0
    # One row per template, its counts summed over the cells.
    assert [(t["prefix"], t["generated"], t["issued"]) for t in total["templates"]] == [("WCA", 4, 4)]
    by_cell = json.loads(issuance(operator, "report", "--activity", slug, "--json", "--by-cell"))
    shares = {name: (r["packages_offered"], r["packages_claimed"]) for name, r in by_cell["cells"].items()}
    assert shares == {"a": (2, 2), "b": (2, 2)} and by_cell["missing_in_cells"] == []
    text = issuance(operator, "report", "--activity", slug, "--by-cell").splitlines()
    assert [line.split()[-5:] for line in text if line.startswith("packages offered")] == [
        ["4", "/", "4", "/", "0"]
    ]
    rows = [line.split() for line in text if line.split()[:1] in (["a"], ["b"])]
    assert rows == [
        ["a", "2", "2", "0", "2", "0", "2", "2", "0"],
        ["b", "2", "2", "0", "2", "0", "2", "2", "0"],
    ]


def run_the_page(client: Any, slug: str, phones: dict[int, list[str]], envs: list[dict[str, str]]) -> None:
    assert 'data-state="open"' in client.get(f"/a/{slug}").text
    accepted = []
    for phone in [*phones[0][:2], *phones[1][:2]]:
        answer = post_claim(client, slug, phone)
        # Before: cell a's two packages were all the page counted; the third was "sold out".
        assert answer.status_code == 202, (phone, answer.text)
        accepted.append(answer.json())
    # The token names the cell the claim went to.
    assert [a["status_token"].split(".")[0] for a in accepted] == ["0", "0", "1", "1"]
    answers = settle(client, *accepted, timeout=60)
    # Before: cell b's claims were never found, their status stayed "accepted".
    assert [a["status"] for a in answers] == ["credited"] * 4, answers
    assert [claims_in(env[f"{PREFIX}DATABASE_URL"]) for env in envs] == [2, 2]
    assert [dead_letters(env[f"{PREFIX}DATABASE_URL"]) for env in envs] == [0, 0]
    # Cell b's number claims again: the page finds its grant in cell b's Redis
    # (the page's own is cell a's) and answers at once, publishing nothing.
    # Before: accepted, queued, and refused by cell b's workers later.
    b_redis = redis.Redis.from_url(envs[1][f"{PREFIX}REDIS_URL"])
    member = phone_digest(phones[1][0], PHONE_KEY).hex()
    wait_for(lambda: b_redis.sismember(gate.activity_key(slug), member), 10, "cell b's grant in its Redis")
    again = post_claim(client, slug, phones[1][0])
    assert again.json().get("reason") == "already_received", again.text
    assert claims_in(envs[1][f"{PREFIX}DATABASE_URL"]) == 2
    # Every cell's packages are gone: now the page says so.
    assert 'data-state="sold_out"' in client.get(f"/a/{slug}").text
    refused = post_claim(client, slug, phones[1][2]).json()
    assert refused["reason"] == "sold_out", refused
    # A token made before the cell map (no cell in it) still finds the claim.
    key = status_key(PHONE_KEY)
    legacy = {**accepted[3], "status_token": status_token(key, uuid.UUID(accepted[3]["claim_id"]))}
    assert read_status(client, legacy).json()["status"] == "credited"
    # A token whose cell was changed does not match.
    forged = {**accepted[3], "status_token": "0" + accepted[3]["status_token"][1:]}
    assert read_status(client, forged).status_code == 404
