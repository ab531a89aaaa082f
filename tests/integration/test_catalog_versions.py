"""The catalog's version across cells, on two real databases: a change of
the catalog is applied to every cell only when they agree, each cell's
transaction commits only if the cell is still at the version read
(compare-and-set), a failure half-way names the cells with and without the
change and running the command again completes it, and the cross-cell
verify names cells whose catalogs differ."""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from issuance.shared.backoffice import catalog
from issuance.shared.cli import build_parser
from issuance.shared.errors import OperatorError
from issuance.shared.settings import PREFIX, Settings, settings_from
from sqlalchemy.orm import Session

from tests.conftest import private_services

ACTIVITY = """
slug: {slug}
title: Versions {slug}
channel: versions
starts_at: 2026-01-01T00:00:00+08:00
ends_at: 2030-01-01T00:00:00+08:00
budget: {budget}
validity_days: 7
templates:
  - {{prefix: '{prefix}', kind: amount_off, value: 500}}
"""


@pytest.fixture(scope="module")
def cells() -> Iterator[tuple[Settings, list[str]]]:
    """An operator's settings with a two-cell map, and the cells' databases."""
    with private_services() as a, private_services() as b:
        envs = [a, b]
        cell_map = [
            {
                "name": name,
                "number": number,
                "database_url": env[f"{PREFIX}DATABASE_URL"],
                "amqp_url": env[f"{PREFIX}AMQP_URL"],
            }
            for number, (name, env) in enumerate(zip("ab", envs, strict=True))
        ]
        operator = settings_from({**a, f"{PREFIX}CELLS": json.dumps(cell_map)})
        yield operator, [env[f"{PREFIX}DATABASE_URL"] for env in envs]


def issuance(settings: Settings, *argv: str) -> str:
    args = build_parser().parse_args(list(argv))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert int(args.func(args, settings)) == 0
    return out.getvalue()


def versions(urls: list[str]) -> list[int]:
    out = []
    for url in urls:
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT version FROM catalog_version").fetchone()
            assert row is not None
            out.append(int(row[0]))
    return out


def rows(url: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchall()


def alone(url: str) -> Settings:
    """The settings of one cell, as its own back office has them."""
    return settings_from({f"{PREFIX}DATABASE_URL": url})


def activity_file(tmp_path: Path, slug: str, prefix: str, budget: int = 10) -> str:
    path = tmp_path / f"{slug}.yaml"
    path.write_text(ACTIVITY.format(slug=slug, prefix=prefix, budget=budget))
    return str(path)


@contextlib.contextmanager
def holding_lock_then(url: str, then: str) -> Iterator[None]:
    """Lock the catalog's version row of one cell until another session waits
    for it; then run ``then`` on the waiting backend's database."""

    def run() -> None:
        with psycopg.connect(url) as conn:
            conn.execute("SELECT 1 FROM catalog_version FOR UPDATE")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                # The statistics views are read once per transaction unless cleared.
                conn.execute("SELECT pg_stat_clear_snapshot()")
                waiting = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock'"
                ).fetchone()
                if waiting:
                    conn.execute(then.format(pid=waiting[0]))
                    return
                time.sleep(0.05)
            raise AssertionError("nothing waited for the catalog's version row")

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield
    finally:
        thread.join()


def test_a_change_reaches_every_cell_with_one_version(
    cells: tuple[Settings, list[str]], tmp_path: Path
) -> None:
    operator, urls = cells
    start = versions(urls)
    assert start[0] == start[1]
    out = issuance(operator, "cells", "apply", "--", "channel", "create", "versions")
    assert "[a] catalog version" in out and "[b] catalog version" in out
    # `cells each` runs a catalog change the same way.
    path = activity_file(tmp_path, "v-one", "VNA")
    issuance(operator, "cells", "each", "--", "activity", "create", "--file", path)
    assert versions(urls) == [start[0] + 2, start[1] + 2]
    # Budgets are each cell's share: a split changes no catalog version.
    issuance(operator, "cells", "split", "v-one", "--budget", "30")
    assert [rows(u, "SELECT budget FROM activities WHERE slug = 'v-one'")[0][0] for u in urls] == [15, 15]
    again = issuance(operator, "cells", "apply", "--", "activity", "create", "--file", path)
    # The same change again: already in every cell, nothing done.
    assert again.count("already applied") == 2
    assert versions(urls) == [start[0] + 2, start[1] + 2]
    report = json.loads(_verify(operator))
    assert report["breaches"]["catalog_differs_between_cells"] == 0


def _verify(operator: Settings) -> str:
    args = build_parser().parse_args(["verify", "--cells", "--json"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        args.func(args, operator)
    return out.getvalue()


def test_a_cell_changed_alone_is_refused_and_shown(cells: tuple[Settings, list[str]], tmp_path: Path) -> None:
    operator, urls = cells
    path = activity_file(tmp_path, "v-alone", "VAL")
    issuance(operator, "cells", "apply", "--", "activity", "create", "--file", path)
    issuance(alone(urls[1]), "activity", "edit", "v-alone", "--set", "title=Changed in b alone")
    before = versions(urls)
    assert before[1] == before[0] + 1
    with pytest.raises(OperatorError, match=r"the cells' catalogs differ \(a version \d+, digest \w{12}; b"):
        issuance(operator, "cells", "apply", "--", "activity", "edit", "v-alone", "--set", "online=false")
    assert versions(urls) == before
    assert rows(urls[0], "SELECT online FROM activities WHERE slug = 'v-alone'") == [(True,)]
    report = json.loads(_verify(operator))
    assert report["breaches"]["catalog_differs_between_cells"] == 2
    assert [row[0] for row in report["examples"]["catalog_differs_between_cells"]] == ["a", "b"]
    # Put right through the same back office in cell a: the catalogs agree again.
    issuance(alone(urls[0]), "activity", "edit", "v-alone", "--set", "title=Changed in b alone")
    assert json.loads(_verify(operator))["breaches"]["catalog_differs_between_cells"] == 0


def test_a_write_made_since_the_version_was_read_is_refused(
    cells: tuple[Settings, list[str]],
) -> None:
    _, urls = cells
    from issuance.shared.db import database

    engine = database.engine(alone(urls[0]))
    try:
        with Session(engine) as session:
            read = catalog.catalog_state(session)
        catalog_before = rows(urls[0], "SELECT name FROM channels ORDER BY name")
        issuance(alone(urls[0]), "channel", "create", "v-meanwhile")
        with (
            pytest.raises(catalog.CatalogMoved, match="since it was read at version"),
            Session(engine) as session,
            session.begin(),
            catalog.expecting(read, "a-change"),
        ):
            catalog.create_channel(session, "v-late")
    finally:
        engine.dispose()
    assert rows(urls[0], "SELECT name FROM channels ORDER BY name") == sorted(
        [*catalog_before, ("v-meanwhile",)]
    )
    # Cell b gets the same channel, so that the cells agree again.
    issuance(alone(urls[1]), "channel", "create", "v-meanwhile")


def test_a_failure_half_way_names_the_cells_and_a_rerun_completes(
    cells: tuple[Settings, list[str]], tmp_path: Path
) -> None:
    operator, urls = cells
    path = activity_file(tmp_path, "v-half", "VHA")
    before = versions(urls)
    # Cell b's connection is cut while its change waits for the version row.
    with (
        holding_lock_then(urls[1], "SELECT pg_terminate_backend({pid})"),
        pytest.raises(OperatorError) as refused,
    ):
        issuance(operator, "cells", "apply", "--", "activity", "create", "--file", path)
    assert "applied in: a; not in: b; run the same command again to complete it" in str(refused.value)
    assert [len(rows(u, "SELECT 1 FROM activities WHERE slug = 'v-half'")) for u in urls] == [1, 0]
    assert versions(urls) == [before[0] + 1, before[1]]
    out = issuance(operator, "cells", "apply", "--", "activity", "create", "--file", path)
    assert "[a] already applied" in out and f"[b] catalog version {before[1]} -> {before[1] + 1}" in out
    assert [len(rows(u, "SELECT 1 FROM activities WHERE slug = 'v-half'")) for u in urls] == [1, 1]
    assert json.loads(_verify(operator))["breaches"]["catalog_differs_between_cells"] == 0


def test_a_cell_changed_while_a_change_runs_keeps_the_change_out(
    cells: tuple[Settings, list[str]], tmp_path: Path
) -> None:
    """Compare-and-set: cell b's catalog changes after the versions were read
    and before cell b's transaction commits; cell b refuses, and the run
    again refuses too, since b no longer is where a was."""
    operator, urls = cells
    path = activity_file(tmp_path, "v-race", "VRA")
    before = versions(urls)
    bump = (
        "UPDATE catalog_version SET version = version + 1,"
        " digest = 'changed-alone', change = NULL  -- pid {pid} waits"
    )
    with holding_lock_then(urls[1], bump), pytest.raises(OperatorError) as refused:
        issuance(operator, "cells", "apply", "--", "activity", "create", "--file", path)
    message = str(refused.value)
    moved = f"the catalog moved to version {before[1] + 1} since it was read at version {before[1]}"
    assert f"cell b: {moved}" in message
    assert "applied in: a; not in: b" in message
    assert [len(rows(u, "SELECT 1 FROM activities WHERE slug = 'v-race'")) for u in urls] == [1, 0]
    with pytest.raises(OperatorError, match="the cells' catalogs differ"):
        issuance(operator, "cells", "apply", "--", "activity", "create", "--file", path)


def test_a_command_writing_twice_makes_one_version(cells: tuple[Settings, list[str]]) -> None:
    _, urls = cells
    from issuance.shared.db import database

    engine = database.engine(alone(urls[0]))
    try:
        with Session(engine) as session:
            read = catalog.catalog_state(session)
        with Session(engine) as session, session.begin(), catalog.expecting(read, "two-writes"):
            catalog.create_channel(session, "v-twice-1")
            catalog.create_channel(session, "v-twice-2")
        with Session(engine) as session:
            after = catalog.catalog_state(session)
    finally:
        engine.dispose()
    assert (after.version, after.change, after.previous_digest) == (
        read.version + 1,
        "two-writes",
        read.digest,
    )
