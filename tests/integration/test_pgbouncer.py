"""The project behind PgBouncer in transaction mode (Debian's pgbouncer).

In transaction mode consecutive transactions of one client may run on
different server connections, and different clients on the same one. A
statement psycopg prepared on one server connection is then missing, or
already there under the same name, for the next transaction:
``ISSUANCE_DB_PREPARED_STATEMENTS=false`` turns automatic preparing off.

The test starts its own pgbouncer on a free port, in front of the session's
private database, with one server connection per database so that two
clients must share it.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from issuance.shared.db import database
from issuance.shared.settings import Settings

from tests.chaos.services import free_port
from tests.conftest import claim, make_activity, verify_clean

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
pytestmark = pytest.mark.skipif(
    not Path(PGBOUNCER).exists(),
    reason="Debian's pgbouncer is not installed (apt-get install pgbouncer)",
)
# psycopg prepares a query the fifth time one connection runs it.
RUNS = 8


@pytest.fixture
def bouncer(settings: Settings) -> Iterator[str]:
    """The database URL of ``settings``, through a private pgbouncer in transaction mode."""
    target = urlsplit(settings.database_url)
    port = free_port()
    # pytest's own temporary directories are private to root.
    tmp_path = Path(tempfile.mkdtemp(prefix="issuance-pgbouncer-"))
    shutil.chown(tmp_path, "postgres", "postgres")
    users = tmp_path / "userlist.txt"
    users.write_text(f'"{target.username}" ""\n')
    config = tmp_path / "pgbouncer.ini"
    config.write_text(
        f"""[databases]
* = host={target.hostname} port={target.port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {users}
pool_mode = transaction
default_pool_size = 1
max_client_conn = 50
ignore_startup_parameters = extra_float_digits,options
logfile = {tmp_path / "pgbouncer.log"}
pidfile = {tmp_path / "pgbouncer.pid"}
"""
    )
    for path in (users, config):
        path.chmod(0o644)
    # pgbouncer refuses to run as root: -u drops to the postgres user.
    proc = subprocess.Popen([PGBOUNCER, "-u", "postgres", str(config)], stderr=subprocess.PIPE)
    url = f"postgresql://{target.username}@127.0.0.1:{port}{target.path}"
    deadline = time.monotonic() + 20
    while True:
        try:
            psycopg.connect(url, connect_timeout=2).close()
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"pgbouncer did not start: {proc.stderr.read() if proc.stderr else ''}")
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    shutil.rmtree(tmp_path, ignore_errors=True)


def run_twice(settings: Settings) -> list[str]:
    """Two pooled connections run one query ``RUNS`` times each, one
    transaction at a time, over pgbouncer's single server connection;
    the errors they met."""
    pool = database.pool(settings, min_size=2, max_size=2)
    errors: list[str] = []
    try:
        with pool.connection() as first, pool.connection() as second:
            for conn in (first, second):
                for i in range(RUNS):
                    try:
                        with conn.transaction():
                            conn.execute(
                                "SELECT count(*) FROM claims WHERE claim_id IS NOT NULL AND %s > 0", (i + 1,)
                            )
                    except psycopg.Error as exc:
                        errors.append(type(exc).__name__)
    finally:
        pool.close()
    return errors


def test_prepared_statements_break_behind_pgbouncer_in_transaction_mode(
    settings: Settings, bouncer: str
) -> None:
    errors = run_twice(dataclasses.replace(settings, database_url=bouncer))
    assert errors and set(errors) <= {"DuplicatePreparedStatement", "InvalidSqlStatementName"}, errors


def test_the_setting_turns_them_off_and_nothing_fails(settings: Settings, bouncer: str) -> None:
    behind = dataclasses.replace(settings, database_url=bouncer, db_prepared_statements=False)
    assert run_twice(behind) == []


def test_claims_are_decided_through_pgbouncer(settings: Settings, bouncer: str) -> None:
    """The claim path (group commit, locks, ON CONFLICT) in transaction mode."""
    from issuance.workers import handlers

    behind = dataclasses.replace(settings, database_url=bouncer, db_prepared_statements=False)
    activity = make_activity(settings, budget=40, codes=40)["slug"]
    claims = [claim(activity) for _ in range(50)]
    pool = database.pool(behind, max_size=4)
    outcomes: list[Any] = []
    try:
        for start in range(0, len(claims), 10):
            outcomes += handlers.handle_claims(pool, behind, claims[start : start + 10])
        # Again: every claim is a duplicate now, nothing changes.
        repeats = handlers.handle_claims(pool, behind, claims[:10])
    finally:
        pool.close()
    assert sum(1 for o in outcomes if not o.reason) == 40
    assert all(o.duplicate for o in repeats)
    report = verify_clean(settings)
    assert report["counts"]["claims"] == 50
