"""Phone key rotation on the stored side: how many members each key still
holds, and re-keying members from an older key to the current one.

A digest is a keyed hash of the number: it cannot be turned into the digest
under another key without the number. Members are therefore re-keyed from
numbers, in two ways: every claim or registration of a number found under an
older key moves its member (issuance.shared.db.store.rekey_members, in the
worker's transaction), and :func:`rekey` moves the members of a list of
numbers (the shop's member export), in batches of one short transaction
each, while the pipeline runs. Both are idempotent: a member already under
the current key is left as it is. deploy/SECURITY.md gives the three steps.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

import psycopg
import redis
from issuance.shared import gate
from issuance.shared.db import store
from issuance.shared.domain import InvalidPhone, normalize_phone, phone_digests
from issuance.shared.errors import BadInput
from issuance.shared.settings import PhoneKeys, Settings, require_phone_keys

log = logging.getLogger(__name__)

MEMBERS_PER_KEY = "SELECT phone_key_id, count(*) FROM members GROUP BY phone_key_id ORDER BY phone_key_id"
# What the page's gate holds for these numbers (issuance.shared.gate): the
# activities and groups of their members' packages, under the current digest.
GRANTS = """
SELECT k.activity_slug, k.exclusivity_group, m.phone_digest
  FROM members m JOIN claims k USING (member_id)
 WHERE m.phone_digest = ANY(%s) AND k.status <> 'refused' AND k.exclusivity_group IS NOT NULL
"""


@dataclasses.dataclass(frozen=True, slots=True)
class KeyCount:
    key_id: str
    members: int
    role: str  # "current", "older" (still looked up) or "not configured"


def members_per_key(conn: psycopg.Connection[Any], settings: Settings) -> list[KeyCount]:
    """Members stored under each key ID, and each configured key with none."""
    keys = require_phone_keys(settings)
    counted = {str(kid): int(n) for kid, n in conn.execute(MEMBERS_PER_KEY)}
    found = []
    for kid in [*keys.ids, *sorted(set(counted) - set(keys.ids))]:
        role = "current" if kid == keys.current_id else "older" if kid in keys.ids else "not configured"
        found.append(KeyCount(kid, counted.get(kid, 0), role))
    return found


@dataclasses.dataclass(slots=True)
class RekeyReport:
    numbers: int = 0
    invalid: int = 0
    rekeyed: int = 0
    batches: int = 0


def _older(keys: PhoneKeys, from_id: str | None) -> list[tuple[str, str]]:
    older = list(keys.secrets[1:])
    if from_id is None:
        return older
    if from_id == keys.current_id:
        raise BadInput(f"key {from_id!r} is the current phone key: re-key from an older one")
    chosen = [(kid, secret) for kid, secret in older if kid == from_id]
    if not chosen:
        raise BadInput(f"key {from_id!r} is not a configured phone key ({', '.join(keys.ids)})")
    return chosen


def _batches(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    numbers = (line.strip() for line in lines)
    wanted = (n for n in numbers if n and not n.startswith("#"))
    while batch := list(islice(wanted, size)):
        yield batch


def rekey(
    conn: psycopg.Connection[Any],
    client: redis.Redis | None,
    settings: Settings,
    lines: Iterable[str],
    *,
    from_id: str | None = None,
    batch_size: int = 1000,
) -> RekeyReport:
    """Move the members of these numbers (one a line, as typed on the page)
    from the older phone keys (or only ``from_id``) to the current one, a
    transaction per batch on ``conn`` (autocommit off); then write the
    numbers' packages into the page's gate under the current digest, so the
    gate still knows them once the older key is removed."""
    keys = require_phone_keys(settings)
    chain = [keys.secrets[0], *_older(keys, from_id)]
    report = RekeyReport()
    for batch in _batches(lines, batch_size):
        numbers = []
        for typed in batch:
            try:
                numbers.append(phone_digests(normalize_phone(typed, settings.default_region), chain))
            except InvalidPhone:
                report.invalid += 1
        report.numbers += len(batch)
        report.batches += 1
        current = [digests[0][1] for digests in numbers]
        with conn.transaction():
            report.rekeyed += len(store.rekey_members(conn, keys.current_id, numbers))
            grants = [(str(a), str(g), bytes(d)) for a, g, d in conn.execute(GRANTS, (current,))]
        if client is not None and grants:
            gate.remember_grants(client, grants)
        log.info("re-keyed %d members of %d numbers so far", report.rekeyed, report.numbers)
    return report
