"""Key fingerprints: the page and every worker prove they hash phone numbers
with the same key, and that it is the key the database's members were hashed
with, without the database ever holding the key.

The first process to start records ``HMAC-SHA256(key, CONTEXT)`` of each
phone key under the key's ID; every later one compares its own and refuses
to go on when they differ. A key ID therefore names one secret for good, and
changing the phone key is a deliberate act (a new key ID, deploy/SECURITY.md
says how), never the side effect of a missing or mistyped variable.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime
from typing import Any

from issuance.shared.settings import PREFIX, SINGLE_PHONE_KEY_ID, PhoneKeyError, Settings, require_phone_keys
from psycopg import AsyncConnection, Connection

PHONE_KEY = "phone_key"
# What is hashed with the key: a constant that no phone number can be.
CONTEXT = b"issuance key fingerprint v1"

RECORD = """
INSERT INTO key_fingerprints (name, fingerprint) VALUES (%s, %s)
ON CONFLICT (name) DO NOTHING
"""
# A statement of its own (read committed): a process that lost the race to
# record the fingerprint waits for the winner's insert and then reads it.
READ = "SELECT fingerprint, recorded_at FROM key_fingerprints WHERE name = %s"


class PhoneKeyMismatch(PhoneKeyError):
    """This process's phone key is not the one recorded in the database."""


def fingerprint(key: str) -> bytes:
    return hmac.new(key.encode(), CONTEXT, hashlib.sha256).digest()


def record_name(key_id: str) -> str:
    """The row of a key ID: the single key (ID "1") keeps the name it had
    before keys had IDs, so existing deployments keep their fingerprint."""
    return PHONE_KEY if key_id == SINGLE_PHONE_KEY_ID else f"{PHONE_KEY}:{key_id}"


def _variable(key_id: str) -> str:
    if key_id == SINGLE_PHONE_KEY_ID:
        return f"{PREFIX}PHONE_KEY"
    return f"{PREFIX}PHONE_KEYS entry {key_id!r}"


def _compare(key_id: str, mine: bytes, row: tuple[Any, ...] | None) -> None:
    if row is None:  # the row cannot go away; only a restore from an older backup could do this
        raise PhoneKeyMismatch("the phone key fingerprint could not be recorded")
    recorded, recorded_at = bytes(row[0]), row[1]
    if not hmac.compare_digest(mine, recorded):
        when = recorded_at.isoformat(timespec="seconds") if isinstance(recorded_at, datetime) else recorded_at
        raise PhoneKeyMismatch(
            f"{_variable(key_id)} is not the key this database's numbers are hashed with"
            f" (fingerprint {recorded.hex()[:12]}, recorded {when}; this process has {mine.hex()[:12]}):"
            " give the page and every worker the same key"
        )


def _mine(settings: Settings) -> list[tuple[str, bytes]]:
    """(record name, fingerprint) of every configured phone key."""
    return [(kid, fingerprint(secret)) for kid, secret in require_phone_keys(settings).secrets]


def check_phone_key(conn: Connection[Any], settings: Settings) -> None:
    """Record the fingerprint of each phone key (by key ID) on first use, or
    raise PhoneKeyMismatch when one differs from the recorded one."""
    for key_id, mine in _mine(settings):
        with conn.transaction():
            conn.execute(RECORD, (record_name(key_id), mine))
            row = conn.execute(READ, (record_name(key_id),)).fetchone()
        _compare(key_id, mine, row)


async def check_phone_key_async(conn: AsyncConnection[Any], settings: Settings) -> None:
    """check_phone_key on an asyncio connection (the page)."""
    for key_id, mine in _mine(settings):
        async with conn.transaction():
            await conn.execute(RECORD, (record_name(key_id), mine))
            cursor = await conn.execute(READ, (record_name(key_id),))
            row = await cursor.fetchone()
        _compare(key_id, mine, row)
