"""Worker processes refuse to start, with one clear line, when the phone key
is missing, short or not the one the database's numbers are hashed with."""

from __future__ import annotations

import os

import psycopg
import pytest
from issuance.shared.db import fingerprints

from tests.e2e.conftest import Workers


def _run_workers(service_env, tmp_path, **extra: str) -> tuple[int, str]:
    log = tmp_path / "workers.log"
    env = {**os.environ, **service_env, "ISSUANCE_TEST_LOG": str(log), **extra}
    env.pop("PYTEST_CURRENT_TEST", None)
    workers = Workers(env, processes=1, threads=1, queues=["claims"])
    try:
        code = workers.proc.wait(timeout=60)
    finally:
        workers.stop()
    return code, log.read_text()


@pytest.mark.parametrize(
    ("key", "says"),
    [
        ("", "ISSUANCE_PHONE_KEY is not set"),
        ("short", "ISSUANCE_PHONE_KEY is 5 bytes long"),
        ("dev-only-phone-key-change-me", "ISSUANCE_PHONE_KEY is a placeholder value"),
    ],
)
def test_workers_refuse_to_start_without_a_proper_phone_key(service_env, settings, tmp_path, key, says):
    code, log = _run_workers(service_env, tmp_path, ISSUANCE_PHONE_KEY=key)
    assert code != 0
    assert [line for line in log.splitlines() if "cannot start" in line] == [
        line for line in log.splitlines() if says in line
    ], log
    assert says in log and "Traceback" not in log, log


def test_workers_refuse_to_start_with_another_key_than_the_database(service_env, settings, tmp_path):
    with psycopg.connect(settings.database_url) as conn:
        fingerprints.check_phone_key(conn, settings)  # as the page or the first worker would
    code, log = _run_workers(service_env, tmp_path, ISSUANCE_PHONE_KEY="a-different-key-0123456789")
    assert code != 0
    assert "cannot start: ISSUANCE_PHONE_KEY is not the key this database's numbers are hashed with" in log, (
        log
    )
    assert "Traceback" not in log, log
