"""Key fingerprints: the page and every worker prove they hash phone numbers
with the same key, and that it is the key the database's members were hashed
with, without the database ever holding the key.

The first process to start records ``HMAC-SHA256(key, CONTEXT)`` under the
key's name; every later one compares its own and refuses to go on when they
differ. Changing the phone key is therefore a deliberate act (deploy/SECURITY.md
says how), never the side effect of a missing or mistyped variable.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime
from typing import Any

from issuance.shared.settings import PREFIX, PhoneKeyError, Settings, require_phone_key
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


def _compare(mine: bytes, row: tuple[Any, ...] | None) -> None:
    if row is None:  # the row cannot go away; only a restore from an older backup could do this
        raise PhoneKeyMismatch("the phone key fingerprint could not be recorded")
    recorded, recorded_at = bytes(row[0]), row[1]
    if not hmac.compare_digest(mine, recorded):
        when = recorded_at.isoformat(timespec="seconds") if isinstance(recorded_at, datetime) else recorded_at
        raise PhoneKeyMismatch(
            f"{PREFIX}PHONE_KEY is not the key this database's numbers are hashed with"
            f" (fingerprint {recorded.hex()[:12]}, recorded {when}; this process has {mine.hex()[:12]}):"
            " give the page and every worker the same key"
        )


def check_phone_key(conn: Connection[Any], settings: Settings) -> None:
    """Record this key's fingerprint on first use, or raise PhoneKeyMismatch."""
    mine = fingerprint(require_phone_key(settings))
    with conn.transaction():
        conn.execute(RECORD, (PHONE_KEY, mine))
        row = conn.execute(READ, (PHONE_KEY,)).fetchone()
    _compare(mine, row)


async def check_phone_key_async(conn: AsyncConnection[Any], settings: Settings) -> None:
    """check_phone_key on an asyncio connection (the page)."""
    mine = fingerprint(require_phone_key(settings))
    async with conn.transaction():
        await conn.execute(RECORD, (PHONE_KEY, mine))
        cursor = await conn.execute(READ, (PHONE_KEY,))
        row = await cursor.fetchone()
    _compare(mine, row)
