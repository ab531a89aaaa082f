"""Code generation next to the raw COPY ceiling of the same table.

    .venv/bin/python -m benchmarks.codegen --count 1000000

In one private database and one run: (1) the ceiling, a COPY into ``codes``
of codes generated beforehand (only the COPY is timed); (2) ``issuance codes
generate``'s path, ``issuance.shared.backoffice.catalog.generate_codes``, timed end to end
(CSPRNG, formatting, COPY, batch row, commit). Rounds alternate so that
neither path always meets the bigger table.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import time
from datetime import UTC, datetime, timedelta

import psycopg
from issuance.shared import domain
from issuance.shared.backoffice import catalog
from issuance.shared.db import database
from issuance.shared.settings import settings_from
from sqlalchemy.orm import Session

ADMIN_DSN = os.environ.get("ISSUANCE_BENCH_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def _prefixes(n: int) -> list[str]:
    return ["".join(secrets.choice(domain.CODE_ALPHABET) for _ in range(3)) for _ in range(n)]


def raw_copy(url: str, prefix: str, count: int, *, ordered: bool = False) -> float:
    """Seconds for COPY alone of ``count`` ready-made rows into ``codes``
    (``ordered``: sorted beforehand, as generate_codes does)."""
    with psycopg.connect(url) as conn:
        template_id = conn.execute(
            "SELECT template_id FROM coupon_templates WHERE prefix = %s", (prefix,)
        ).fetchone()[0]
        batch_id = conn.execute(
            "INSERT INTO code_batches (template_id, size) VALUES (%s, %s) RETURNING batch_id",
            (template_id, count),
        ).fetchone()[0]
        conn.commit()
        suffix = f"\t{template_id}\t{batch_id}\n"
        codes = domain.new_codes(prefix, count)
        if ordered:
            codes.sort()
        rows = "".join(c + suffix for c in codes).encode()
        started = time.perf_counter()
        with conn.cursor().copy("COPY codes (code, template_id, batch_id) FROM STDIN") as copy:
            copy.write(rows)
        conn.commit()
        return time.perf_counter() - started


# What each part of the ``codes`` table costs a COPY: dropped one after the
# other inside a transaction that is rolled back (the schema is untouched).
ABLATION = [
    ("full schema", []),
    ("- template and batch foreign keys", ["codes_template_id_fkey", "codes_batch_id_fkey"]),
    (
        "- nullable foreign keys (claim, rebate, order)",
        ["codes_claim_member_fkey", "codes_rebate_member_fkey", "codes_order_id_fkey"],
    ),
    (
        "- check constraints",
        [
            "codes_status_check",
            "codes_binding_check",
            "codes_bound_status_check",
            "codes_one_owner_check",
            "codes_used_order_check",
            "codes_used_detail_check",
        ],
    ),
    ("- index codes_available_idx (template_id, code)", ["INDEX codes_available_idx"]),
    (
        "- unique (code, claim_id, member_id) for the wallet FK",
        ["wallet_code_binding_fkey", "codes_binding_key"],
    ),
    # (The index of codes by batch was dropped by migration 0006.)
    ("- unique (claim_id, template_id)", ["codes_one_per_template_key"]),
    ("- primary key (code): a bare heap", ["codes_pkey"]),
]


def ablation(url: str, prefix: str, count: int) -> list[tuple[str, float]]:
    """COPY rates of sorted rows as the table's parts are dropped one by one."""
    results = []
    dropped: list[str] = []
    with psycopg.connect(url) as conn:
        template_id = conn.execute(
            "SELECT template_id FROM coupon_templates WHERE prefix = %s", (prefix,)
        ).fetchone()[0]
        batch_id = conn.execute(
            "INSERT INTO code_batches (template_id, size) VALUES (%s, 0) RETURNING batch_id", (template_id,)
        ).fetchone()[0]
        conn.commit()
    for label, parts in ABLATION:
        dropped += parts
        rows = "".join(f"{c}\t{template_id}\t{batch_id}\n" for c in sorted(domain.new_codes(prefix, count)))
        with psycopg.connect(url) as conn:
            for part in dropped:
                if part.startswith("INDEX "):
                    conn.execute(f"DROP INDEX {part.split()[1]}")
                else:
                    table = "wallet_ledger" if part.startswith("wallet_") else "codes"
                    conn.execute(f"ALTER TABLE {table} DROP CONSTRAINT {part} CASCADE")
            started = time.perf_counter()
            with conn.cursor().copy("COPY codes (code, template_id, batch_id) FROM STDIN") as copy:
                copy.write(rows.encode())
            rate = count / (time.perf_counter() - started)
            conn.rollback()
        print(f"  {label:55} {rate:>10,.0f} rows/s", flush=True)
        results.append((label, rate))
    return results


def generate(settings, prefix: str, count: int) -> float:
    engine = database.engine(settings)
    started = time.perf_counter()
    with Session(engine) as session, session.begin():
        catalog.generate_codes(session, prefix, count)
    elapsed = time.perf_counter() - started
    engine.dispose()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ablation", type=int, default=0, help="also profile the table with this many rows")
    args = parser.parse_args()
    tag = f"issuance_bench_codegen_{secrets.token_hex(3)}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{tag}"')
    try:
        settings = settings_from({"ISSUANCE_DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/{tag}"})
        database.upgrade(settings)
        prefixes = _prefixes(3 * args.rounds + 1)
        now = datetime.now(UTC)
        engine = database.engine(settings)
        with Session(engine) as session, session.begin():
            catalog.create_channel(session, "bench")
            spec = {
                "slug": "bench",
                "title": "bench",
                "channel": "bench",
                "starts_at": now,
                "ends_at": now + timedelta(days=1),
                "budget": 0,
                "templates": [{"prefix": p, "kind": "gift", "value": 100} for p in prefixes],
            }
            catalog.create_activity(session, catalog.ActivitySpec.from_mapping(spec))
        engine.dispose()
        results = []
        for r in range(args.rounds):
            raw_s = raw_copy(settings.database_url, prefixes[3 * r], args.count)
            sorted_s = raw_copy(settings.database_url, prefixes[3 * r + 1], args.count, ordered=True)
            gen_s = generate(settings, prefixes[3 * r + 2], args.count)
            results.append({"raw_copy_s": raw_s, "raw_sorted_copy_s": sorted_s, "generate_s": gen_s})
            print(
                f"round {r + 1}: raw COPY {args.count / raw_s:,.0f} rows/s ({raw_s:.2f} s);"
                f" raw COPY of sorted rows {args.count / sorted_s:,.0f} rows/s ({sorted_s:.2f} s);"
                f" generate {args.count / gen_s:,.0f} codes/s ({gen_s:.2f} s);"
                f" ratios {raw_s / gen_s:.2f} and {sorted_s / gen_s:.2f}",
                flush=True,
            )
        with psycopg.connect(settings.database_url) as conn:
            total = conn.execute("SELECT count(*), count(DISTINCT code) FROM codes").fetchone()
        assert total == (3 * args.rounds * args.count,) * 2, total
        profile = []
        if args.ablation:
            print(
                f"COPY of {args.ablation:,} sorted rows into codes ({total[0]:,} rows)"
                " as its parts are dropped:"
            )
            profile = ablation(settings.database_url, prefixes[-1], args.ablation)
        best_gen = min(r["generate_s"] for r in results)
        best_raw = min(r["raw_copy_s"] for r in results)
        best_sorted = min(r["raw_sorted_copy_s"] for r in results)
        summary = {
            "count": args.count,
            "generate_codes_per_s": round(args.count / best_gen),
            "raw_copy_rows_per_s": round(args.count / best_raw),
            "raw_sorted_copy_rows_per_s": round(args.count / best_sorted),
            "ratio_to_raw_copy": round(best_raw / best_gen, 2),
            "ratio_to_raw_sorted_copy": round(best_sorted / best_gen, 2),
            "rounds": results,
            "codes_in_table": total[0],
            "ablation_rows_per_s": {label: round(rate) for label, rate in profile},
        }
        print(json.dumps(summary, indent=2))
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{tag}" WITH (FORCE)')


if __name__ == "__main__":
    main()
