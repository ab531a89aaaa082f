"""Code generation next to the raw COPY ceiling of the same table.

    .venv/bin/python -m benchmarks.codegen --count 1000000

In one private database and one run: (1) the ceiling, a COPY into ``codes``
of codes generated beforehand (only the COPY is timed); (2) ``issuance codes
generate``'s path, ``shared.backoffice.generate_codes``, timed end to end
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
from sqlalchemy.orm import Session

from shared import backoffice, database, domain
from shared.settings import settings_from

ADMIN_DSN = os.environ.get("ISSUANCE_BENCH_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def _prefixes(n: int) -> list[str]:
    return ["".join(secrets.choice(domain.CODE_ALPHABET) for _ in range(3)) for _ in range(n)]


def raw_copy(url: str, prefix: str, count: int) -> float:
    """Seconds for COPY alone of ``count`` ready-made rows into ``codes``."""
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
        rows = "".join(c + suffix for c in domain.new_codes(prefix, count)).encode()
        started = time.perf_counter()
        with conn.cursor().copy("COPY codes (code, template_id, batch_id) FROM STDIN") as copy:
            copy.write(rows)
        conn.commit()
        return time.perf_counter() - started


def generate(settings, prefix: str, count: int) -> float:
    engine = database.engine(settings)
    started = time.perf_counter()
    with Session(engine) as session, session.begin():
        backoffice.generate_codes(session, prefix, count)
    elapsed = time.perf_counter() - started
    engine.dispose()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    tag = f"issuance_bench_codegen_{secrets.token_hex(3)}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{tag}"')
    try:
        settings = settings_from({"ISSUANCE_DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/{tag}"})
        database.upgrade(settings)
        prefixes = _prefixes(2 * args.rounds)
        now = datetime.now(UTC)
        engine = database.engine(settings)
        with Session(engine) as session, session.begin():
            backoffice.create_channel(session, "bench")
            spec = {
                "slug": "bench",
                "title": "bench",
                "channel": "bench",
                "starts_at": now,
                "ends_at": now + timedelta(days=1),
                "budget": 0,
                "templates": [{"prefix": p, "kind": "gift", "value": 100} for p in prefixes],
            }
            backoffice.create_activity(session, backoffice.ActivitySpec.from_mapping(spec))
        engine.dispose()
        results = []
        for r in range(args.rounds):
            raw_s = raw_copy(settings.database_url, prefixes[2 * r], args.count)
            gen_s = generate(settings, prefixes[2 * r + 1], args.count)
            results.append({"raw_copy_s": raw_s, "generate_s": gen_s})
            print(
                f"round {r + 1}: raw COPY {args.count / raw_s:,.0f} rows/s ({raw_s:.2f} s);"
                f" generate {args.count / gen_s:,.0f} codes/s ({gen_s:.2f} s); ratio {raw_s / gen_s:.2f}",
                flush=True,
            )
        with psycopg.connect(settings.database_url) as conn:
            total = conn.execute("SELECT count(*), count(DISTINCT code) FROM codes").fetchone()
        assert total == (2 * args.rounds * args.count,) * 1 or total[0] == total[1]
        best_gen = min(r["generate_s"] for r in results)
        best_raw = min(r["raw_copy_s"] for r in results)
        summary = {
            "count": args.count,
            "generate_codes_per_s": round(args.count / best_gen),
            "raw_copy_rows_per_s": round(args.count / best_raw),
            "ratio_to_raw_copy": round(best_raw / best_gen, 2),
            "rounds": results,
            "codes_in_table": total[0],
        }
        print(json.dumps(summary, indent=2))
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{tag}" WITH (FORCE)')


if __name__ == "__main__":
    main()
