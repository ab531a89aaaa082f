"""Three cells on real services: two databases on the shared PostgreSQL, one
in a private PostgreSQL instance on another port, three vhosts, real workers
per cell. A flood of claims through the routing publisher, with repeat
numbers, re-sends and the same number on two similar activities; a
rebalance and a restart of the private cell's database in the middle; every
invariant checked per cell and over all cells; then breaches planted across
cells to show what the cross-cell verify catches."""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from issuance.shared.cli import build_parser
from issuance.shared.errors import OperatorError
from issuance.shared.settings import PREFIX, Settings, settings_from

from tests.chaos.services import PrivatePostgres
from tests.conftest import RABBIT_HOST, _rabbitmqctl, cell_map, claim, private_services
from tests.e2e.conftest import Workers, consumers, wait_for

PHONE_KEY = "test-phone-key-0123456789abcdef"
ACTIVITY = """
slug: {slug}
title: Cells {slug}
channel: cells
starts_at: {starts}
ends_at: {ends}
budget: 10
validity_days: 7
exclusivity_group: cells-twins
templates:
  - {{prefix: '{prefix}', kind: amount_off, value: 500}}
"""


@contextlib.contextmanager
def private_instance_cell() -> Iterator[tuple[dict[str, str], PrivatePostgres]]:
    """A cell whose database is a PostgreSQL instance of its own."""
    from issuance.shared.db import database

    base = Path(tempfile.mkdtemp(prefix="issuance-cells-"))
    os.chmod(base, 0o755)
    tag = f"issuance_t_{secrets.token_hex(4)}"
    postgres = PrivatePostgres(base)
    try:
        _rabbitmqctl("add_vhost", tag)
        _rabbitmqctl("set_permissions", "-p", tag, "guest", ".*", ".*", ".*")
        redis_db = int(tag[-2:], 16) % 15 + 1
        env = {
            f"{PREFIX}DATABASE_URL": postgres.url(),
            f"{PREFIX}AMQP_URL": f"amqp://guest:guest@{RABBIT_HOST}/{tag}",
            f"{PREFIX}REDIS_URL": f"redis://127.0.0.1:6379/{redis_db}",
            f"{PREFIX}PHONE_KEY": PHONE_KEY,
            f"{PREFIX}MIN_BACKOFF_MS": "100",
            f"{PREFIX}MAX_BACKOFF_MS": "1000",
        }
        database.upgrade(settings_from(env))
        yield env, postgres
    finally:
        postgres.close()
        with contextlib.suppress(Exception):
            _rabbitmqctl("delete_vhost", tag)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def cells() -> Iterator[tuple[list[dict[str, str]], PrivatePostgres]]:
    with private_services() as a, private_services() as b, private_instance_cell() as (c, postgres):
        yield [a, b, c], postgres


def issuance(settings: Settings, *argv: str) -> tuple[int, str]:
    """Run an ``issuance`` command as the operator would, its output captured."""
    args = build_parser().parse_args(list(argv))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = int(args.func(args, settings))
    return status, out.getvalue()


def counts(url: str, sql: str, *params: Any) -> Any:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


def test_three_cells_keep_every_invariant_per_cell_and_over_all(
    cells: tuple[list[dict[str, str]], PrivatePostgres], tmp_path: Path
) -> None:
    envs, postgres = cells
    for env in envs:
        redis.Redis.from_url(env[f"{PREFIX}REDIS_URL"]).flushdb()
    operator = settings_from({**envs[0], f"{PREFIX}CELLS": cell_map(envs)})
    urls = [env[f"{PREFIX}DATABASE_URL"] for env in envs]

    # Defined once, applied to every cell; member IDs bounded per cell.
    assert issuance(operator, "cells", "init")[0] == 0
    assert issuance(operator, "cells", "each", "--", "channel", "create", "cells")[0] == 0
    from issuance.shared.wire.messages import utcnow

    now = utcnow()
    slugs = {"first": "cells-first", "twin": "cells-twin"}
    prefixes = {"first": "CFA", "twin": "CFB"}
    for key, slug in slugs.items():
        path = tmp_path / f"{slug}.yaml"
        path.write_text(
            ACTIVITY.format(
                slug=slug,
                prefix=prefixes[key],
                starts=now.isoformat(),
                ends=(now.replace(year=now.year + 1)).isoformat(),
            )
        )
        assert issuance(operator, "cells", "each", "--", "activity", "create", "--file", str(path))[0] == 0
    status, out = issuance(
        operator, "cells", "split", slugs["first"], "--budget", "600", "--codes", "CFA=600"
    )
    assert status == 0, out
    assert (
        issuance(operator, "cells", "split", slugs["twin"], "--budget", "300", "--codes", "CFB=300")[0] == 0
    )
    assert [r[0] for url in urls for r in counts(url, "SELECT budget FROM activities ORDER BY slug")] == [
        200, 100, 200, 100, 200, 100,
    ]  # fmt: skip

    # Real workers per cell, each on its own database and vhost.
    log = tmp_path / "workers.log"
    workers = []
    try:
        for name, env in zip("abc", envs, strict=True):
            # Each cell's workers know their cell: a claim routed elsewhere would be dead-lettered.
            cell = {f"{PREFIX}CELLS": cell_map(envs), f"{PREFIX}CELL": name}
            worker_env = {**os.environ, **env, **cell, "ISSUANCE_TEST_LOG": str(log)}
            worker_env.pop("PYTEST_CURRENT_TEST", None)
            workers.append(Workers(worker_env, 1, 4, None))
        for env in envs:
            wait_for(lambda env=env: consumers(settings_from(env), "claims") >= 1, 90, "workers to consume")
        flood(operator, envs, urls, postgres, slugs)
    finally:
        for worker in workers:
            worker.stop()

    # Every invariant, per cell and over all cells.
    status, out = issuance(
        operator, "verify", "--budget", f"{slugs['first']}=600", "--budget", f"{slugs['twin']}=300"
    )
    assert status == 0, out + log.read_text()[-3000:]
    assert "verify across cells: clean" in out
    report = json.loads(issuance(operator, "verify", "--cells", "--json")[1])
    # Each cell's verify is the whole of its own: its vhost's acceptance ledger too.
    assert all(cell["breaches"]["accepted_unrecorded"] == 0 for cell in report["cells"].values())
    granted = {slug: sum(cells_.values()) for slug, cells_ in report["granted"].items()}
    # 1,500 numbers for 600 + 300 packages of two similar activities: both sell out.
    assert granted == {slugs["first"]: 600, slugs["twin"]: 300}, report["granted"]
    assert sorted(report["budgets"][slugs["first"]].values()) == [150, 200, 250]

    # Sold out everywhere: a move finds no free slot in the donor and a split
    # would renumber issued packages; both refuse and change nothing.
    with pytest.raises(OperatorError, match="cannot shrink the budget to 149: 150 packages are issued"):
        issuance(operator, "cells", "move", slugs["first"], "--from", "a", "--to", "c", "--slots", "1")
    with pytest.raises(OperatorError, match="split only before claims"):
        issuance(operator, "cells", "split", slugs["first"], "--budget", "900")
    assert issuance(operator, "verify", "--budget", f"{slugs['first']}=600")[0] == 0

    planted_breaches(operator, urls, slugs)


NUMBERS = 1500


def flood(
    operator: Settings,
    envs: list[dict[str, str]],
    urls: list[str],
    postgres: PrivatePostgres,
    slugs: dict[str, str],
) -> None:
    """Every number claims the first activity twice (two claim IDs) and the
    twin once; a third of the claims are re-sent. A tenth in: 50 slots and 50
    codes move from cell a to cell b, then cell c's database restarts."""
    from issuance.shared.wire.cells import publisher_for

    phones = [f"+86139{n:08d}" for n in secrets.SystemRandom().sample(range(10**8), NUMBERS)]
    claims = []
    for phone in phones:
        claims += [claim(slugs["first"], phone), claim(slugs["first"], phone), claim(slugs["twin"], phone)]
    secrets.SystemRandom().shuffle(claims)
    resent = claims[::3]
    # Early enough that cell a still has 50 free slots while its claims run.
    first = len(claims) // 10
    with publisher_for(operator) as publisher:
        publisher.publish_claims(claims[:first], batch=100)
        status, out = issuance(
            operator,
            "cells",
            "move",
            slugs["first"],
            "--from",
            "a",
            "--to",
            "b",
            "--slots",
            "50",
            "--codes",
            "CFA=50",
        )
        assert status == 0, out
        assert "moved 50 slots" in out and "50 CFA codes" in out
        publisher.publish_claims(claims[first:], batch=100)
        postgres.crash()
        time.sleep(1)
        postgres.start()
        publisher.publish_claims(resent, batch=100)
    wanted = len(claims)
    wait_for(
        lambda: sum(counts(url, "SELECT count(*) FROM claims")[0][0] for url in urls) >= wanted,
        240,
        f"{wanted} claims decided over the cells",
    )
    # Every claim once, in its number's cell only (re-sends met their first copy).
    decided = [counts(url, "SELECT count(*), count(DISTINCT claim_id) FROM claims")[0] for url in urls]
    assert sum(n for n, _ in decided) == wanted and all(n == d for n, d in decided), decided
    assert all(n > 0 for n, _ in decided), "the flood reached every cell"
    # The routing publisher and the workers agree: nothing refused as wrong_cell.
    wrong = "SELECT count(*) FROM dead_letters WHERE reason = 'wrong_cell'"
    assert [counts(url, wrong)[0][0] for url in urls] == [0, 0, 0]
    # The credits finish: nothing stays bound.
    wait_for(
        lambda: all(
            counts(url, "SELECT count(*) FROM claims WHERE status = 'bound'")[0][0] == 0 for url in urls
        ),
        120,
        "every bound claim credited",
    )


def planted_breaches(operator: Settings, urls: list[str], slugs: dict[str, str]) -> None:
    """What the checks across cells catch that no single cell can see."""
    a, b, _ = urls
    member, digest, code = counts(
        a, "SELECT m.member_id, m.phone_digest, c.code FROM members m JOIN codes c USING (member_id) LIMIT 1"
    )[0]
    with psycopg.connect(b) as conn:
        # The same number as a member of cell b, with cell a's member ID.
        conn.execute(
            "INSERT INTO members (member_id, phone_digest) OVERRIDING SYSTEM VALUE VALUES (%s, %s)",
            (member, digest),
        )
        # A code of cell a in cell b's pool (its batch grows, so cell b alone looks clean).
        batch = counts(b, "SELECT batch_id, template_id FROM code_batches LIMIT 1")[0]
        conn.execute(
            "INSERT INTO codes (code, template_id, batch_id) VALUES (%s, %s, %s)", (code, batch[1], batch[0])
        )
        conn.execute("UPDATE code_batches SET size = size + 1 WHERE batch_id = %s", (batch[0],))
        # A rebalance gone wrong: cell b grows without the donor shrinking.
        row = conn.execute(
            "SELECT activity_id, budget FROM activities WHERE slug = %s", (slugs["first"],)
        ).fetchone()
        assert row is not None
        slot = counts(
            a,
            "SELECT min(slot_no) FROM package_slots JOIN activities USING (activity_id) WHERE slug = %s",
            slugs["first"],
        )[0][0]
        conn.execute("INSERT INTO package_slots (activity_id, slot_no) VALUES (%s, %s)", (row[0], slot))
        conn.execute("UPDATE activities SET budget = budget + 1 WHERE activity_id = %s", (row[0],))
    status, out = issuance(operator, "verify", "--json", "--budget", f"{slugs['first']}=600")
    report = json.loads(out)
    assert status == 1
    for name, cell_report in report["cells"].items():
        # Each cell on its own: the member ID is outside b's range, but nothing
        # that a cell's own verify checks is broken.
        assert cell_report["clean"], (name, cell_report["examples"])
    breaches = {name for name, n in report["breaches"].items() if n}
    assert breaches == {
        "phone_digest_in_two_cells",
        "member_id_in_two_cells",
        "code_in_two_cells",
        "slot_in_two_cells",
        "cell_budgets_over_platform_budget",
        "member_outside_cell_range",
    }, report["examples"]
    assert report["examples"]["code_in_two_cells"] == [[code, "a", "b"]]
    assert report["examples"]["slot_in_two_cells"] == [[str((slugs["first"], slot)), "a", "b"]]


def test_cell_commands_refuse_in_one_line() -> None:
    """A wrong cell name, a bad map, a cell that cannot be reached: one
    line naming the cell, no traceback."""
    from tests.e2e.test_cli_errors import CLOSED, one_error_line
    from tests.e2e.test_cli_errors import issuance as run

    closed = [
        {"name": "a", "database_url": f"postgresql://{CLOSED}/x", "amqp_url": f"amqp://{CLOSED}/a"},
        {"name": "b", "database_url": f"postgresql://{CLOSED}/y", "amqp_url": f"amqp://{CLOSED}/b"},
    ]
    env = {"ISSUANCE_CELLS": json.dumps(closed)}
    line = one_error_line(run("cells", "move", "x", "--from", "a", "--to", "zz", "--slots", "1", env=env))
    assert line == "error: no cell named 'zz'; cells: a, b"
    handover = ("cells", "handover", "begin", "--slots", "0-9", "--from", "b", "--to", "a")
    line = one_error_line(run(*handover, env=env))
    assert line == "error: cell b does not serve slots 0-9"
    line = one_error_line(run("verify", env=env), status=3)
    assert line.startswith("error: cell a: PostgreSQL cannot be reached"), line
    line = one_error_line(run("report", "--activity", "x", "--by-cell", env=env), status=3)
    assert line.startswith("error: cell a: PostgreSQL cannot be reached"), line
    line = one_error_line(run("cells", "apply", "--", "channel", "create", "x", env=env), status=3)
    assert line.startswith("error: cell a: PostgreSQL cannot be reached"), line
    line = one_error_line(run("cells", "apply", "--", "codes", "generate", env=env))
    assert line.startswith("error: cells apply takes a change of the catalog (channel create,"), line
    line = one_error_line(run("report", "--activity", "x", "--by-cell", env={"ISSUANCE_CELLS": ""}))
    assert line == "error: --by-cell needs a cell map (ISSUANCE_CELLS)"
    bad = {"ISSUANCE_CELLS": json.dumps([{**closed[0], "slots": "0-99"}, {**closed[1], "slots": "90-1023"}])}
    line = one_error_line(run("cells", "show", env=bad))
    assert line == "error: ISSUANCE_CELLS: slot 90 is served by a and b"
