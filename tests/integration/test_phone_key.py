"""The page and the workers prove they share the phone key: the first
process records the key's fingerprint, any later one with another key
refuses to start (and a worker that got past boot refuses claims)."""

from __future__ import annotations

import asyncio
import dataclasses

import psycopg
import pytest
from issuance.producers.web import create_app
from issuance.shared.db import fingerprints
from issuance.shared.settings import PhoneKeyError
from issuance.workers import runtime

OTHER_KEY = "another-phone-key-0123456789"


def _recorded(settings) -> list[bytes]:
    with psycopg.connect(settings.database_url) as conn:
        return [bytes(r[0]) for r in conn.execute("SELECT fingerprint FROM key_fingerprints")]


def test_the_first_process_records_the_fingerprint_and_the_same_key_passes(settings):
    assert _recorded(settings) == []
    with psycopg.connect(settings.database_url) as conn:
        fingerprints.check_phone_key(conn, settings)
        fingerprints.check_phone_key(conn, settings)
    assert _recorded(settings) == [fingerprints.fingerprint(settings.phone_key)]
    assert settings.phone_key.encode() not in _recorded(settings)[0]


def test_another_key_is_refused_with_one_clear_line(settings):
    with psycopg.connect(settings.database_url) as conn:
        fingerprints.check_phone_key(conn, settings)
        with pytest.raises(
            fingerprints.PhoneKeyMismatch, match="ISSUANCE_PHONE_KEY is not the key"
        ) as raised:
            fingerprints.check_phone_key(conn, dataclasses.replace(settings, phone_key=OTHER_KEY))
    assert "\n" not in str(raised.value) and OTHER_KEY not in str(raised.value)


def test_worker_resources_refuse_a_bad_or_different_key(settings):
    with pytest.raises(PhoneKeyError, match="not set"):
        runtime.Resources(dataclasses.replace(settings, phone_key=""))
    runtime.Resources(settings).pool.close()  # records the fingerprint
    other = runtime.Resources(dataclasses.replace(settings, phone_key=OTHER_KEY))
    # Every use retries the check: the worker refuses claims until it has the right key.
    for _ in range(2):
        with pytest.raises(fingerprints.PhoneKeyMismatch):
            other.pool  # noqa: B018
    other.close()


def _start_and_stop(app) -> None:
    async def run() -> None:
        async with app.router.lifespan_context(app):
            pass

    asyncio.run(run())


def test_the_page_refuses_to_start_with_another_key(settings):
    with pytest.raises(PhoneKeyError, match="not set"):
        create_app(dataclasses.replace(settings, phone_key=""))
    _start_and_stop(create_app(settings))  # records the fingerprint
    assert _recorded(settings) == [fingerprints.fingerprint(settings.phone_key)]
    with pytest.raises(fingerprints.PhoneKeyMismatch):
        _start_and_stop(create_app(dataclasses.replace(settings, phone_key=OTHER_KEY)))
