"""Where the time of a claim batch goes: wall time per claim of each step of
the claim transaction (each SQL statement of issuance.shared.db.store, phone parsing,
digests), one batch at a time on one connection, on a private database.

    .venv/bin/python -m benchmarks.claim_profile [--pool 300000] [--batches 50] [--batch 200]

Single-threaded on purpose: the figures add up to the batch's time, and
PostgreSQL's share is the statements' time (the client waits for them).
"""

from __future__ import annotations

import argparse
import functools
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from issuance.shared.db import database, store
from issuance.workers import handlers

from benchmarks.harness import private_services
from benchmarks.pipeline import Workload, make_activity

STEPS = {
    store: [
        "lock_claim_ids",
        "claims_by_ids",
        "activity_by_slug",
        "lock_members",
        "member_grants",
        "lock_free_slots",
        "lock_free_codes",
        "insert_claims",
        "take_slots",
        "bind_codes",
        "write_wallet",
    ],
    handlers: ["payload_digest", "normalize_phone", "phone_digests"],
}


def timed(spent: defaultdict[str, float], name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - started

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pool", type=int, default=300_000)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--batch", type=int, default=200)
    args = parser.parse_args()
    spent: defaultdict[str, float] = defaultdict(float)
    for module, names in STEPS.items():
        for name in names:
            setattr(module, name, timed(spent, name, getattr(module, name)))
    with private_services(f"issuance_bench_{uuid.uuid4().hex[:8]}") as (settings, _env):
        slug = make_activity(settings, "profile", args.pool, args.pool)
        workload = Workload(slug, seed=1)
        with database.pool(settings, max_size=1) as pool:
            # Warm up, then give the planner statistics of a table in use.
            for _ in range(10):
                handlers.handle_claims(pool, settings, workload.take(args.batch))
            with pool.connection() as conn:
                conn.execute("ANALYZE claims")
                conn.execute("ANALYZE members")
            spent.clear()
            with pool.connection() as conn:
                wal_before = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
            started = time.perf_counter()
            for _ in range(args.batches):
                handlers.handle_claims(pool, settings, workload.take(args.batch))
            total = time.perf_counter() - started
            with pool.connection() as conn:
                row = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", wal_before).fetchone()
                wal = float(row[0]) if row else 0.0
    claims = args.batches * args.batch
    print(f"{claims} claims in batches of {args.batch}: {total * 1e6 / claims:.1f} us per claim in all")
    print(f"  WAL written: {wal / claims:,.0f} bytes per claim")
    for name, seconds in sorted(spent.items(), key=lambda item: -item[1]):
        print(f"  {name:20s} {seconds * 1e6 / claims:7.1f} us/claim")
    rest = total - sum(spent.values())
    print(f"  {'the rest (Python, commit)':20s} {rest * 1e6 / claims:7.1f} us/claim")


if __name__ == "__main__":
    main()
