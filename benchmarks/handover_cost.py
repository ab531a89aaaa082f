"""What the ring handover adds to each claim transaction: the guard (a SHARE
lock on ring_handovers and a read of the batch's slots, in workers that
serve a named cell), and the members' upsert that also records their ring
slot (issuance.shared.db.store.UPSERT_MEMBERS) against the same upsert
without it, on members known already (the common case; it only locks them).
Timed alone, on a private database filled with members, one batch at a
time on one connection, the two upserts alternating.

    .venv/bin/python -m benchmarks.handover_cost [--members 100000] [--batches 300] [--batch 200]
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from issuance.shared.db import cells, database, store
from issuance.shared.domain import phone_digests
from issuance.shared.domain.cells import route_slot
from issuance.shared.settings import PREFIX, settings_from

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


@contextmanager
def private_database() -> Iterator[str]:
    tag = f"issuance_handover_cost_{secrets.token_hex(4)}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{tag}"')
    url = f"postgresql://postgres@127.0.0.1:5432/{tag}"
    try:
        database.upgrade(settings_from({f"{PREFIX}DATABASE_URL": url, f"{PREFIX}PHONE_KEY": "x" * 32}))
        yield url
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{tag}" WITH (FORCE)')


# The upsert before migration 0017, for comparison.
UPSERT_WITHOUT_SLOT = """
INSERT INTO members (phone_digest, phone_masked, status, phone_key_id)
SELECT d, m, 'pending', %s FROM unnest(%s::bytea[], %s::text[]) AS u(d, m) ORDER BY d
ON CONFLICT (phone_digest) DO UPDATE SET phone_masked = EXCLUDED.phone_masked WHERE false
RETURNING phone_digest, member_id
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--batch", type=int, default=200)
    args = parser.parse_args()
    key = [("1", "benchmark-phone-key-0123456789abcdef")]
    phones = [f"+86139{n:08d}" for n in secrets.SystemRandom().sample(range(10**8), args.members)]
    ring = {phone_digests(p, key)[0][1]: route_slot(p) for p in phones}
    digests = list(ring)
    timings: dict[str, list[float]] = {"guard": [], "upsert with ring slot": [], "upsert without": []}
    with private_database() as url, psycopg.connect(url) as conn:
        with conn.cursor().copy("COPY members (phone_digest, ring_slot) FROM STDIN") as copy:
            for digest, slot in ring.items():
                copy.write_row((digest, slot))
        conn.execute(
            "INSERT INTO ring_handovers (slot, from_cell, to_cell, state) VALUES (1, 'a', 'b', 'done')"
        )
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE members")  # as autovacuum would have
        conn.autocommit = False
        for _ in range(args.batches):
            batch = secrets.SystemRandom().sample(digests, args.batch)
            masked = {d: "+86139****0000" for d in batch}
            with conn.transaction():
                t0 = time.perf_counter()
                cells.slot_verdicts(conn, "a", [ring[d] for d in batch])
                timings["guard"].append(time.perf_counter() - t0)
            with conn.transaction():
                t0 = time.perf_counter()
                store.lock_members(conn, masked, key_id="1", ring_slots=ring)
                timings["upsert with ring slot"].append(time.perf_counter() - t0)
            with conn.transaction():
                t0 = time.perf_counter()
                # lock_members as it was: the upsert, then the known members' IDs
                ordered = sorted(batch)
                rows = conn.execute(UPSERT_WITHOUT_SLOT, ("1", ordered, [masked[d] for d in ordered]))
                new = {bytes(d) for d, _ in rows}
                known = [d for d in ordered if d not in new]
                conn.execute(store.LOCK_MEMBERS, (known,), prepare=False).fetchall()
                timings["upsert without"].append(time.perf_counter() - t0)
    print(f"{args.members} members, {args.batches} batches of {args.batch} claims (medians per batch)")
    for name, values in timings.items():
        print(f"{name}: {statistics.median(values) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
