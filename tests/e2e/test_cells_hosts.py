"""Two cells whose workers run on two test hosts (network namespaces,
tests/cluster/hosts.py), one cell each; the services stay on this machine
and each host reaches them through its veth link (a socat forwarder per
service on the link's machine end).

Claims for numbers of both cells go through the routing publisher
(``publisher_for`` over the cell map), a third of them re-sent. Then cell
a's host is cut off the network, as a pulled cable: cell b goes on deciding
and crediting its claims while cell a decides nothing; its claims wait in
its queue. The link comes back and cell a catches up. In the end every
claim is decided once, in the cell its number routes to, and credited once;
each cell's verify and the verify across cells are clean.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import psycopg
import pytest
from issuance.shared.cli import build_parser
from issuance.shared.settings import PREFIX, Settings, settings_from

from tests.cluster.hosts import NetHost
from tests.conftest import cell_map, claim, private_services
from tests.e2e.conftest import consumers, wait_for

# Test hosts need iproute2 and socat (`make testhosts`) and root, as CI runs.
pytestmark = pytest.mark.skipif(
    shutil.which("socat") is None or shutil.which("ip") is None or os.geteuid() != 0,
    reason="needs root, socat and iproute2 (apt-get install socat iproute2)",
)
CELLS = "ab"
NUMBERS = 240  # half before the cut, half during it
ACTIVITY = """
slug: {slug}
title: Cells on two hosts
channel: cells-hosts
starts_at: 2020-01-01T00:00:00+00:00
ends_at: 2099-01-01T00:00:00+00:00
budget: 10
validity_days: 7
templates:
  - {{prefix: CHA, kind: amount_off, value: 500}}
"""


@pytest.fixture(scope="module")
def two_cells() -> Iterator[list[dict[str, str]]]:
    with private_services() as a, private_services() as b:
        yield [a, b]


@pytest.fixture
def hosts() -> Iterator[list[NetHost]]:
    made: list[NetHost] = []
    try:
        # Other indexes than the partition test's: the two may run on one machine.
        made += [NetHost(21), NetHost(22)]
        yield made
    finally:
        for host in made:
            host.close()


def on_host(host: NetHost, env: dict[str, str]) -> dict[str, str]:
    """``env``'s services as the host reaches them: through its link. Guest
    may log in to RabbitMQ only from loopback, which the forwarder is."""
    database, broker, cache = (urlsplit(env[f"{PREFIX}{k}_URL"]) for k in ("DATABASE", "AMQP", "REDIS"))
    pg, mq, rd = (host.forward(u.port or d) for u, d in ((database, 5432), (broker, 5672), (cache, 6379)))
    return {
        # A transaction left open by a cut-off host ends after 5 s.
        f"{PREFIX}DATABASE_URL": f"postgresql://postgres@{host.gateway}:{pg}{database.path}"
        "?options=-c%20idle_in_transaction_session_timeout%3D5000",
        f"{PREFIX}AMQP_URL": f"amqp://guest:guest@{host.gateway}:{mq}/{quote(broker.path.lstrip('/'))}",
        f"{PREFIX}REDIS_URL": f"redis://{host.gateway}:{rd}{cache.path}",
    }


def issuance(settings: Settings, *argv: str) -> tuple[int, str]:
    args = build_parser().parse_args(list(argv))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = int(args.func(args, settings))
    return status, out.getvalue()


def rows(url: str, sql: str, *params: Any) -> list[Any]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


def decided(url: str) -> int:
    return int(rows(url, "SELECT count(*) FROM claims")[0][0])


@pytest.mark.timeout(900)
def test_a_cut_off_cell_host_stalls_only_its_cell(
    two_cells: list[dict[str, str]], hosts: list[NetHost], tmp_path: Path
) -> None:
    envs = two_cells
    urls = [env[f"{PREFIX}DATABASE_URL"] for env in envs]
    operator = settings_from({**envs[0], f"{PREFIX}CELLS": cell_map(envs)})
    slug = f"ch-{secrets.token_hex(3)}"
    assert issuance(operator, "cells", "init")[0] == 0
    assert issuance(operator, "cells", "each", "--", "channel", "create", "cells-hosts")[0] == 0
    spec = tmp_path / "activity.yaml"
    spec.write_text(ACTIVITY.format(slug=slug))
    assert issuance(operator, "cells", "each", "--", "activity", "create", "--file", str(spec))[0] == 0
    status, out = issuance(operator, "cells", "split", slug, "--budget", "600", "--codes", "CHA=600")
    assert status == 0, out

    # Each cell's workers on their own host, their map naming the services as that host reaches them.
    for name, host, env in zip(CELLS, hosts, envs, strict=True):
        reached = [on_host(host, e) for e in envs]
        own = reached[CELLS.index(name)]
        worker_env = {**os.environ, **env, **own, f"{PREFIX}CELLS": cell_map(reached), f"{PREFIX}CELL": name}
        worker_env.pop("PYTEST_CURRENT_TEST", None)
        host.workers(worker_env, tmp_path / f"{name}.log", processes=1, threads=4)
    try:
        for env in envs:
            wait_for(lambda env=env: consumers(settings_from(env), "claims") >= 1, 120, "hosts to consume")
    except AssertionError:
        raise AssertionError(logs(tmp_path)) from None

    from issuance.shared.cellmap import load_cell_map
    from issuance.shared.wire.cells import publisher_for

    cells = load_cell_map(operator)
    phones = [f"+86136{n:08d}" for n in secrets.SystemRandom().sample(range(10**8), NUMBERS)]
    claims = [claim(slug, phone) for phone in phones]
    home = {c.claim_id: CELLS.index(cells.cell_for_phone(c.phone).name) for c in claims}
    before, during = claims[: NUMBERS // 2], claims[NUMBERS // 2 :]
    wanted = [[sum(home[c.claim_id] == n for c in part) for n in (0, 1)] for part in (before, during)]
    assert min(min(w) for w in wanted) > 0, wanted  # both cells in both halves

    with publisher_for(operator) as publisher:
        publisher.publish_claims(before, batch=40)
        publisher.publish_claims(before[::3], batch=40)  # re-sent: they meet their first copy
        wait_for(lambda: [credited(u) for u in urls] == wanted[0], 120, "the first half credited")

        hosts[0].cut()
        cut_at = time.monotonic()
        publisher.publish_claims(during, batch=40)
        publisher.publish_claims(during[::3], batch=40)
        # Cell b goes on: every claim of its number decided and credited.
        total_b = wanted[0][1] + wanted[1][1]
        wait_for(lambda: credited(urls[1]) == total_b, 120, "cell b to credit its claims with a cut away")
        time.sleep(max(0.0, 5 - (time.monotonic() - cut_at)))
        # Cell a stalls: not one claim of the second half decided while its host is cut off.
        stalled = [decided(u) for u in urls]
        assert stalled == [wanted[0][0], total_b], (stalled, wanted)
        cut_for = time.monotonic() - cut_at
        hosts[0].restore()
        restored_at = time.monotonic()
        total_a = wanted[0][0] + wanted[1][0]
        try:
            wait_for(lambda: credited(urls[0]) == total_a, 300, "cell a to catch up once restored")
        except AssertionError:
            raise AssertionError(logs(tmp_path)) from None
        caught_up = time.monotonic() - restored_at

    print(f"cells on hosts: cut {cut_for:.1f}s, cell a caught up {caught_up:.1f}s after the link came back")
    # Every claim once, in its own cell, credited once.
    for n, url in enumerate(urls):
        ids = {r[0] for r in rows(url, "SELECT claim_id FROM claims WHERE status = 'credited'")}
        assert ids == {c for c, cell in home.items() if cell == n}, f"cell {CELLS[n]}"
        ledger = rows(url, "SELECT count(*), count(DISTINCT claim_id) FROM wallet_ledger")[0]
        assert ledger == (len(ids), len(ids)), (CELLS[n], ledger)
        assert rows(url, "SELECT count(*) FROM dead_letters")[0][0] == 0
    status, out = issuance(operator, "verify", "--budget", f"{slug}=600")
    assert status == 0, out
    assert "verify across cells: clean" in out
    report = json.loads(issuance(operator, "verify", "--cells", "--json")[1])
    assert all(cell["clean"] for cell in report["cells"].values()), report
    assert {s: sum(c.values()) for s, c in report["granted"].items()} == {slug: NUMBERS}


def credited(url: str) -> int:
    return int(rows(url, "SELECT count(*) FROM claims WHERE status = 'credited'")[0][0])


def logs(tmp_path: Path) -> str:
    return "\n".join(f"{p.name}: {p.read_text()[-2000:]}" for p in sorted(tmp_path.glob("*.log")))
