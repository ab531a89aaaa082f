"""deploy/postgresql/roles.sql on the real PostgreSQL, inside a transaction
that is rolled back (roles are cluster-wide): the page's role reads what the
page reads and can change nothing but the phone key fingerprint."""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg
import pytest
from issuance.producers.web.queries import ACTIVITY_PAGE, CLAIM_STATUS
from issuance.shared.db.fingerprints import READ, RECORD
from issuance.shared.settings import Settings

ROLES = Path(__file__).parents[2] / "deploy" / "postgresql" / "roles.sql"


def test_the_page_role_reads_and_cannot_write(settings: Settings) -> None:
    with psycopg.connect(settings.database_url) as conn:
        conn.execute(ROLES.read_text())
        conn.execute("SET ROLE issuance_page")
        conn.execute(ACTIVITY_PAGE, ("no-such-activity",)).fetchall()
        conn.execute(CLAIM_STATUS, (uuid.uuid4(),)).fetchall()
        conn.execute(RECORD, ("roles-test", b"x" * 32))
        conn.execute(READ, ("roles-test",)).fetchall()
        for statement in (
            "UPDATE claims SET status = status",
            "DELETE FROM codes",
            "UPDATE key_fingerprints SET fingerprint = fingerprint",
            "CREATE TABLE page_was_here (x int)",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
                conn.execute(statement)
        conn.rollback()


def test_the_worker_role_writes_rows_but_not_the_schema(settings: Settings) -> None:
    with psycopg.connect(settings.database_url) as conn:
        conn.execute(ROLES.read_text())
        conn.execute("SET ROLE issuance_worker")
        conn.execute("UPDATE claims SET status = status WHERE false")
        with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
            conn.execute("CREATE TABLE worker_was_here (x int)")
        conn.rollback()
