"""What one exporter reading costs on a large campaign.

Builds a throw-away database with one running activity holding ``--codes``
codes over two templates (10 million by default), ``--claims`` granted claims
(each bound to one code per template, a few thousand still uncredited),
shares and share opens; then times every exporter query (median of
``--repeat`` runs, with EXPLAIN ANALYZE buffers) and ``Exporter.refresh()``
with and without the campaign figures. For comparison it also times the
naive count of the available pool, which the exporter avoids.

    .venv/bin/python benchmarks/exporter_cost.py                 # 10 M codes, 500 k claims
    .venv/bin/python benchmarks/exporter_cost.py --codes 1000000 --claims 50000

Needs the local PostgreSQL (``make services``); RabbitMQ is read too if it
is there.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).parents[1]))

from issuance.shared.db import analytics, database
from issuance.shared.settings import settings_from
from issuance.workers.exporter import Exporter

ADMIN_DSN = os.environ.get("ISSUANCE_TEST_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")

BUILD = [
    (
        "channel and activity",
        """
        INSERT INTO channels (name) VALUES ('bench');
        INSERT INTO activities (slug, title, channel_id, starts_at, ends_at, budget, exclusivity_group,
                                validity_days)
        SELECT 'bench', 'Bench', channel_id, now() - interval '1 hour', now() + interval '1 day',
               %(budget)s, 'solo:bench', 7 FROM channels;
        INSERT INTO coupon_templates (activity_id, position, prefix, kind, value)
        SELECT activity_id, p, prefix, 'amount_off', 500
          FROM activities, (VALUES (1, 'BNA'), (2, 'BNB')) AS t(p, prefix);
        INSERT INTO code_batches (template_id, size) SELECT template_id, %(half)s FROM coupon_templates;
        INSERT INTO package_slots (activity_id, slot_no, taken)
        SELECT 1, g, g <= %(claims)s FROM generate_series(1, %(budget)s) g;
    """,
    ),
    (
        "codes",
        """
        INSERT INTO codes (code, template_id, batch_id)
        SELECT t.prefix || lpad(g::text, 9, '0'), t.template_id, b.batch_id
          FROM coupon_templates t JOIN code_batches b USING (template_id), generate_series(1, %(half)s) g;
    """,
    ),
    (
        "members",
        """
        INSERT INTO members (phone_digest, phone_masked)
        SELECT sha256(g::text::bytea), '+86139****' || lpad((g %% 100)::text, 2, '0')
          FROM generate_series(1, %(claims)s) g;
    """,
    ),
    (
        "shares and opens",
        """
        INSERT INTO shares (share_id, order_id, activity_id, referrer_member_id, placed_at)
        SELECT gen_random_uuid(), 'SO-' || g, 1, g, now() - interval '1 hour'
          FROM generate_series(1, %(shares)s) g;
        INSERT INTO share_opens (event_id, share_id, opened_at)
        SELECT gen_random_uuid(), share_id, now() FROM shares, generate_series(1, 3);
    """,
    ),
    (
        "claims",
        """
        INSERT INTO claims (claim_id, activity_slug, activity_id, exclusivity_group, member_id, share_id,
                            slot_no, status, new_member, payload_digest, requested_at, decided_at, deadline,
                            credited_at)
        SELECT gen_random_uuid(), 'bench', 1, 'solo:bench', g, NULL, g,
               CASE WHEN g > %(claims)s - %(uncredited)s THEN 'bound' ELSE 'credited' END, g %% 3 = 0,
               '\\x00', r, r, r + interval '1 day',
               CASE WHEN g > %(claims)s - %(uncredited)s THEN NULL ELSE r + interval '2 seconds' END
          FROM generate_series(1, %(claims)s) g,
               LATERAL (SELECT now() - make_interval(secs => (%(claims)s - g) * 0.05)) AS t(r);
        INSERT INTO claims (claim_id, activity_slug, activity_id, status, reason, payload_digest,
                            requested_at, deadline)
        SELECT gen_random_uuid(), 'bench', 1, 'refused', 'already_received', '\\x00', now(),
               now() + interval '1 day'
          FROM generate_series(1, %(claims)s / 10);
    """,
    ),
    (
        "binding",
        """
        UPDATE codes c SET status = 'unused', member_id = cl.member_id, claim_id = cl.claim_id,
               bound_at = cl.decided_at, expires_at = cl.decided_at + interval '7 days'
          FROM claims cl, coupon_templates t
         WHERE cl.status <> 'refused' AND t.template_id = c.template_id
           AND c.code = t.prefix || lpad(cl.member_id::text, 9, '0');
        INSERT INTO orders (order_id, member_id, activity_id, amount_cents, discount_cents, status,
                            placed_at, paid_at)
        SELECT 'BO-' || g, g, 1, 10000, 1000, 'paid', now(), now()
          FROM generate_series(5, %(claims)s, 5) g;
        UPDATE codes SET status = 'used', order_id = 'BO-' || member_id, used_at = now(), discount_cents = 500
         WHERE member_id %% 5 = 0;
    """,
    ),
]

NAIVE_AVAILABLE = """
SELECT template_id, count(*) FROM codes WHERE status = 'available' GROUP BY template_id
"""


def timed(
    conn: psycopg.Connection[object], sql: str, params: dict[str, object], repeat: int
) -> dict[str, object]:
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        conn.execute(sql, params).fetchall()
        runs.append((time.perf_counter() - started) * 1000)
    (plan,) = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, params).fetchone()  # type: ignore[misc]
    top = plan[0]
    return {
        "median_ms": round(statistics.median(runs), 2),
        "max_ms": round(max(runs), 2),
        "buffers": top["Plan"].get("Shared Hit Blocks", 0) + top["Plan"].get("Shared Read Blocks", 0),
        "rows": top["Plan"].get("Actual Rows"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--codes", type=int, default=10_000_000)
    parser.add_argument("--claims", type=int, default=500_000)
    parser.add_argument("--uncredited", type=int, default=5_000)
    parser.add_argument("--shares", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the database")
    args = parser.parse_args()
    name = f"issuance_bench_{secrets.token_hex(4)}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    env = {
        "ISSUANCE_DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/{name}",
        "ISSUANCE_AMQP_URL": os.environ.get("ISSUANCE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"),
    }
    settings = settings_from(env)
    result: dict[str, object] = {"codes": args.codes, "claims": args.claims, "uncredited": args.uncredited}
    try:
        database.upgrade(settings)
        params = {
            "half": args.codes // 2,
            "claims": args.claims,
            "budget": args.claims * 2,
            "uncredited": args.uncredited,
            "shares": args.shares,
        }
        build: dict[str, float] = {}
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            for step, sql in BUILD:
                started = time.perf_counter()
                for statement in filter(str.strip, sql.split(";")):
                    conn.execute(statement, params)  # type: ignore[arg-type]
                build[step] = round(time.perf_counter() - started, 1)
                print(f"built {step} in {build[step]}s", file=sys.stderr)
            conn.execute("VACUUM ANALYZE")
            (size,) = conn.execute("SELECT pg_size_pretty(pg_database_size(current_database()))").fetchone()  # type: ignore[misc]
            result["build_seconds"] = build
            result["database_size"] = size
            now = datetime.now(UTC)
            window = {"now": now, "since": now - analytics.REPORT_HORIZON}
            queries = {
                "promise": (analytics.PROMISE, {"now": now, "window": timedelta(minutes=15)}),
                "activities": (analytics.ACTIVITIES, window),
                "shares": (analytics.SHARES, {"ids": [1]}),
                "templates": (analytics.TEMPLATES, window),
                "usage": (analytics.USAGE, {"ids": [1]}),
                "naive available count (avoided)": (NAIVE_AVAILABLE, {}),
            }
            result["queries"] = {k: timed(conn, sql, p, args.repeat) for k, (sql, p) in queries.items()}
        # Campaign figures on the first reading only: the later ones read the promise.
        exporter = Exporter(settings, campaign_interval=3600)
        runs = []
        for _ in range(args.repeat + 1):
            started = time.perf_counter()
            reading = exporter.refresh(now)
            runs.append((time.perf_counter() - started) * 1000)
        assert reading is not None
        assert reading.promise.uncredited == args.uncredited
        assert sum(t.available for t in reading.templates) == args.codes - 2 * args.claims
        result["refresh_with_campaign_ms"] = round(runs[0], 1)
        result["refresh_promise_only_median_ms"] = round(statistics.median(runs[1:]), 1)
    finally:
        if not args.keep:
            with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
