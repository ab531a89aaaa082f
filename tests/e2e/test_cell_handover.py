"""A cell added to a running deployment: ring slots handed from cell b to a
new cell c while claims flow, on real services (three databases, three
vhosts, real workers per cell, left running on the old cell map so that the
handover state in each database is what routes the slots).

Members who claimed in b before the handover claim again after it, in c: a
second package of the same activity, or of its exclusivity group, is
refused there. Claims of the slots sent during the handover are held (not
decided, not lost) until it completes; a producer still on the old map after
it gets wrong_cell from b. Every invariant is checked per cell and across
cells."""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from issuance.shared.domain.cells import RING_SLOTS, route_slot
from issuance.shared.settings import PREFIX, Settings, settings_from

from tests.conftest import claim, private_services
from tests.e2e.conftest import Workers, consumers, wait_for
from tests.e2e.test_cells import ACTIVITY, counts, issuance

# Cell c is added with no ring slot and receives b's upper quarter.
MOVED = range(768, RING_SLOTS)
SLOTS = {"a": "0-511", "b": "512-1023", "c": ""}
NUMBERS = 400


@pytest.fixture(scope="module")
def three() -> Iterator[list[dict[str, str]]]:
    with private_services() as a, private_services() as b, private_services() as c:
        yield [a, b, c]


def slot_map(envs: list[dict[str, str]], slots: dict[str, str]) -> str:
    return json.dumps(
        [
            {
                "name": name,
                "number": number,
                "database_url": env[f"{PREFIX}DATABASE_URL"],
                "amqp_url": env[f"{PREFIX}AMQP_URL"],
                "redis_url": env[f"{PREFIX}REDIS_URL"],
                "slots": slots[name],
            }
            for number, (name, env) in enumerate(zip("abc", envs, strict=True))
        ]
    )


def numbers(count: int, *, moved: bool | None = None) -> list[str]:
    """Distinct numbers; only of the moved ring slots (or only of the
    others) when ``moved`` says so."""
    found: set[str] = set()
    while len(found) < count:
        phone = f"+86138{secrets.randbelow(10**8):08d}"
        if moved is None or (route_slot(phone) in MOVED) == moved:
            found.add(phone)
    return sorted(found)


def total(urls: list[str], sql: str) -> int:
    return sum(int(counts(url, sql)[0][0]) for url in urls)


def test_a_new_cell_takes_ring_slots_while_claims_run(three: list[dict[str, str]], tmp_path: Path) -> None:
    from issuance.shared.wire.messages import utcnow

    envs = three
    for env in envs:
        redis.Redis.from_url(env[f"{PREFIX}REDIS_URL"]).flushdb()
    old_map = slot_map(envs, SLOTS)
    operator = settings_from({**envs[0], f"{PREFIX}CELLS": old_map})
    urls = [env[f"{PREFIX}DATABASE_URL"] for env in envs]

    assert issuance(operator, "cells", "init")[0] == 0
    assert issuance(operator, "cells", "each", "--", "channel", "create", "cells")[0] == 0
    now = utcnow()
    slugs = {"first": "handover-first", "twin": "handover-twin"}
    for key, prefix in (("first", "HVA"), ("twin", "HVB")):
        path = tmp_path / f"{key}.yaml"
        path.write_text(
            ACTIVITY.format(
                slug=slugs[key],
                prefix=prefix,
                starts=now.isoformat(),
                ends=now.replace(year=now.year + 1).isoformat(),
            )
        )
        assert issuance(operator, "cells", "each", "--", "activity", "create", "--file", str(path))[0] == 0
        status, out = issuance(
            operator, "cells", "split", slugs[key], "--budget", "3000", "--codes", f"{prefix}=3000"
        )
        assert status == 0, out

    log = tmp_path / "workers.log"
    workers = []
    try:
        for name, env in zip("abc", envs, strict=True):
            # The old map all along: the handover state in each cell's
            # database, not a restart, moves the slots.
            cell = {f"{PREFIX}CELLS": old_map, f"{PREFIX}CELL": name}
            worker_env = {**os.environ, **env, **cell, "ISSUANCE_TEST_LOG": str(log)}
            worker_env.pop("PYTEST_CURRENT_TEST", None)
            workers.append(Workers(worker_env, 1, 4, None))
        for env in envs:
            wait_for(lambda env=env: consumers(settings_from(env), "claims") >= 1, 90, "workers to consume")
        run_handover(operator, envs, urls, slugs, tmp_path, log)
    finally:
        for worker in workers:
            worker.stop()

    # Every invariant per cell and across cells, the handover's own included.
    status, out = issuance(operator, "verify", "--cells", "--json")
    report = json.loads(out)
    assert status == 0 and report["clean"], report["examples"]
    for check in ("decided_after_moving_out", "package_over_moved_holding", "moved_member_missing"):
        assert report["breaches"][check] == 0
    assert all(cell["breaches"]["accepted_unrecorded"] == 0 for cell in report["cells"].values())
    planted_handover_breaches(operator, urls)


def planted_handover_breaches(operator: Settings, urls: list[str]) -> None:
    """What the handover checks catch: a package over a moved member's
    holding, a member marked moved that its new cell lacks (and decided
    after it left), a handover left half done."""
    import psycopg

    a, b, c = urls
    ((late, slug, group),) = counts(
        c,
        "SELECT k.member_id, k.activity_slug, k.exclusivity_group FROM claims k"
        " JOIN members m USING (member_id) WHERE m.moved_from IS NULL AND k.status <> 'refused' LIMIT 1",
    )
    ((stayed,),) = counts(
        b,
        "SELECT k.member_id FROM claims k JOIN members m USING (member_id)"
        " WHERE k.status <> 'refused' AND m.moved_to IS NULL LIMIT 1",
    )
    with psycopg.connect(c) as conn:
        conn.execute("INSERT INTO member_holdings VALUES (%s, %s, %s, 'b')", (late, slug, group))
    with psycopg.connect(b) as conn:
        conn.execute(
            "UPDATE members SET moved_to = 'c', moved_at = now() - interval '1 day' WHERE member_id = %s",
            (stayed,),
        )
    with psycopg.connect(a) as conn:
        conn.execute(
            "INSERT INTO ring_handovers (slot, from_cell, to_cell, state) VALUES (5, 'a', 'b', 'leaving')"
        )
    status, out = issuance(operator, "verify", "--cells", "--json")
    report = json.loads(out)
    assert status == 1
    found = {name for name, n in report["breaches"].items() if n}
    assert found == {
        "package_over_moved_holding",
        "decided_after_moving_out",
        "moved_member_missing",
        "handover_unfinished",
    }, report["examples"]
    assert report["examples"]["moved_member_missing"] == [["b", str(stayed), "c"]]


def run_handover(
    operator: Settings,
    envs: list[dict[str, str]],
    urls: list[str],
    slugs: dict[str, str],
    tmp_path: Path,
    log: Path,
) -> None:
    from issuance.shared.wire.cells import publisher_for

    _, b, c = urls
    before = numbers(NUMBERS)
    stale_only = numbers(20, moved=True)  # first seen during the handover, through a stale producer
    late = numbers(30, moved=True)  # first seen after it
    moved = [p for p in before if route_slot(p) in MOVED]
    assert len(moved) >= 50, len(moved)
    published = 0

    # 1. Before: every number claims the first activity, in a or b.
    with publisher_for(operator) as old:
        published += old.publish_claims([claim(slugs["first"], p) for p in before], batch=50)
    wait_for(lambda: total(urls, "SELECT count(*) FROM claims") >= published, 120, "the first claims decided")
    assert counts(c, "SELECT count(*) FROM claims")[0][0] == 0

    # 2. Begin: c holds the slots' claims, b still decides them.
    new_map = tmp_path / "cells.json"
    status, out = issuance(
        operator, "cells", "handover", "begin", "--slots", "768-1023", "--from", "b", "--to", "c",
        "--map-out", str(new_map),
    )  # fmt: skip
    assert status == 0, out
    assert {e["name"]: e["slots"] for e in json.loads(new_map.read_text())} == {
        "a": "0-511", "b": "512-767", "c": "768-1023",
    }  # fmt: skip
    updated = settings_from({**envs[0], f"{PREFIX}CELLS": str(new_map)})
    again = [claim(slugs["first"], p) for p in before] + [claim(slugs["twin"], p) for p in before]
    with publisher_for(updated) as new, publisher_for(operator) as old:
        published += new.publish_claims(again, batch=50)
        # A producer not yet on the new map: b still decides these.
        published += old.publish_claims([claim(slugs["twin"], p) for p in stale_only], batch=10)
        held = len(moved) * 2
        wait_for(
            lambda: total(urls, "SELECT count(*) FROM claims") >= published - held,
            120,
            "every claim but the held ones decided",
        )
        time.sleep(3)  # retried, still held
        assert counts(c, "SELECT count(*) FROM claims")[0][0] == 0, "c decided before the members were in"
        assert total(urls, "SELECT count(*) FROM claims") == published - held
        # b decided the twin claims of its remaining slots, and the stale producer's.
        kept = sum(512 <= route_slot(p) < 768 for p in before)
        twins = "SELECT count(*) FROM claims WHERE activity_slug = %s"
        assert counts(b, twins, slugs["twin"])[0][0] == kept + len(stale_only)

        # 3. Finish: members move with what they hold; c decides the held claims.
        status, out = issuance(
            operator, "cells", "handover", "finish", "--slots", "768-1023", "--from", "b", "--to", "c"
        )
        assert status == 0, out
        assert f"{len(moved) + len(stale_only)} members" in out, out
        wait_for(lambda: total(urls, "SELECT count(*) FROM claims") >= published, 120, "held claims decided")

        # After: a new member of the slots starts in c; a stale producer's
        # claim of the slots reaches b, which refuses it as wrong_cell.
        published += new.publish_claims([claim(slugs["first"], p) for p in late], batch=10)
        stale = old.publish_claims([claim(slugs["twin"], p) for p in moved[:10]], batch=5)
    wait_for(lambda: total(urls, "SELECT count(*) FROM claims") >= published, 120, "the late claims decided")
    wrong = "SELECT count(*) FROM dead_letters WHERE reason = 'wrong_cell'"
    wait_for(lambda: counts(b, wrong)[0][0] >= stale, 60, "the stale claims dead-lettered")
    # Nothing accepted lost: each claim decided once or dead-lettered as wrong_cell.
    decided = [counts(url, "SELECT count(*), count(DISTINCT claim_id) FROM claims")[0] for url in urls]
    assert sum(n for n, _ in decided) == published and all(n == d for n, d in decided), decided
    assert [counts(url, wrong)[0][0] for url in urls] == [0, stale, 0], log.read_text()[-3000:]

    # The moved members: in c under their b IDs, history only in b.
    moved_in = counts(c, "SELECT member_id FROM members WHERE moved_from = 'b'")
    moved_out = counts(b, "SELECT member_id FROM members WHERE moved_to = 'c'")
    assert sorted(moved_in) == sorted(moved_out) and len(moved_in) == len(moved) + len(stale_only)
    # c's fast gate knows what they hold: its page answers at once.
    from issuance.shared import gate

    gate_c = redis.Redis.from_url(envs[2][f"{PREFIX}REDIS_URL"])
    holders = {bytes(d) for (d,) in counts(c, "SELECT phone_digest FROM members WHERE moved_from = 'b'")}
    assert {bytes.fromhex(d.decode()) for d in gate_c.smembers(gate.group_key("cells-twins"))} >= holders
    lo_b, lo_c = 2**40, 2 * 2**40
    assert all(lo_b <= m < lo_c for (m,) in moved_in)
    assert all(lo_c <= m for (m,) in counts(c, "SELECT member_id FROM members WHERE moved_from IS NULL")), (
        "members first seen in c get c's IDs"
    )
    # Every claim of a moved member in c was refused: each already held the
    # first activity (or, from the stale producer, its twin) in b.
    refused = counts(
        c,
        "SELECT k.status, k.reason, count(*) FROM claims k JOIN members m USING (member_id)"
        " WHERE m.moved_from = 'b' GROUP BY 1, 2",
    )
    assert {s for s, _, _ in refused} == {"refused"} and sum(n for *_, n in refused) == len(moved) * 2
    granted = "SELECT count(*) FROM claims WHERE status <> 'refused'"
    assert counts(c, granted)[0][0] == len(late)
    # One package per member over the exclusivity group, over all cells.
    per_member: dict[int, int] = {}
    for url in urls:
        for member, n in counts(url, granted.replace("count(*)", "member_id, count(*)") + " GROUP BY 1"):
            per_member[member] = per_member.get(member, 0) + n
    assert set(per_member.values()) == {1} and len(per_member) == len(before) + len(stale_only) + len(late)
