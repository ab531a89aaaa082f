"""Code generation next to a plain COPY of the same rows, in one run.

    .venv/bin/python -m benchmarks.codegen --count 1000000

In one private database and one run, each round: (1) ``issuance codes
generate``'s path, ``issuance.shared.backoffice.catalog.generate_codes``,
timed end to end (CSPRNG, formatting, COPY into ``codes`` with its
per-statement checks, batch row, commit); (2) the ceiling: the very rows it
wrote, in the order it wrote them, COPYed into a plain table with a primary
key on the code and one more index (only the COPY and its commit timed). The
report prints both rates and their ratio; ``--ablation N`` then profiles
``codes`` by dropping its parts one after the other.
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

# The ceiling: the same rows into a table with a primary key on the code and
# one more index, the pool's (a template's codes in generation order), and no
# check of any kind.
PLAIN_TABLE = """
CREATE TABLE plain_codes (
    code varchar(16) PRIMARY KEY,
    template_id integer NOT NULL,
    batch_id integer NOT NULL,
    seq bigint GENERATED ALWAYS AS IDENTITY
);
CREATE INDEX plain_codes_pool_idx ON plain_codes (template_id, seq);
"""


def _prefixes(n: int) -> list[str]:
    return ["".join(secrets.choice(domain.CODE_ALPHABET) for _ in range(3)) for _ in range(n)]


def backend_cpu(pid: int) -> float | None:
    """CPU seconds (user and system) a PostgreSQL backend on this machine has
    used, or None where its process cannot be read. On a shared machine the
    wall clock moves with the load; the CPU a statement costs much less."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _spent(pid: int, before: float | None) -> float | None:
    after = backend_cpu(pid)
    return None if before is None or after is None else after - before


def plain_copy(url: str, batch_id: int) -> tuple[float, float | None]:
    """Seconds for COPY (and commit) alone of the rows of ``batch_id``, in
    generation order, into the plain two-index table, and the backend's CPU
    seconds for it."""
    with psycopg.connect(url) as conn:
        out = bytearray()
        sql = (
            "COPY (SELECT code, template_id, batch_id FROM codes"
            f" WHERE batch_id = {int(batch_id)} ORDER BY seq) TO STDOUT"
        )
        with conn.cursor().copy(sql) as copy:
            for data in copy:
                out += data
        conn.commit()
        pid = conn.info.backend_pid
        cpu = backend_cpu(pid)
        started = time.perf_counter()
        with conn.cursor().copy("COPY plain_codes (code, template_id, batch_id) FROM STDIN") as copy:
            copy.write(bytes(out))
        conn.commit()
        return time.perf_counter() - started, _spent(pid, cpu)


# What each part of the ``codes`` table costs a COPY: dropped one after the
# other inside a transaction that is rolled back (the schema is untouched).
ABLATION = [
    ("full schema", []),
    ("- per-statement key checks (trigger)", ["TRIGGER codes_inserted_check"]),
    (
        "- check constraints",
        [
            "codes_status_check",
            "codes_binding_check",
            "codes_bound_status_check",
            "codes_one_owner_check",
            "codes_used_order_check",
            "codes_used_detail_check",
            "codes_voided_check",
        ],
    ),
    ("- pool index codes_available_idx (template_id, seq)", ["INDEX codes_available_idx"]),
    ("- unique (claim_id, template_id) of bound codes (no entry)", ["INDEX codes_one_per_template_key"]),
    ("- primary key (code): a bare heap", ["codes_pkey"]),
]


def _drop(conn: psycopg.Connection, part: str) -> None:
    kind, _, name = part.partition(" ")
    if kind == "INDEX":
        conn.execute(f"DROP INDEX {name}")
    elif kind == "TRIGGER":
        conn.execute(f"DROP TRIGGER {name} ON codes")
    else:
        conn.execute(f"ALTER TABLE codes DROP CONSTRAINT {part} CASCADE")


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
                _drop(conn, part)
            started = time.perf_counter()
            with conn.cursor().copy("COPY codes (code, template_id, batch_id) FROM STDIN") as copy:
                copy.write(rows.encode())
            rate = count / (time.perf_counter() - started)
            conn.rollback()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM codes")  # the rolled-back rows' index entries
        print(f"  {label:60} {rate:>10,.0f} rows/s", flush=True)
        results.append((label, rate))
    return results


def generate(settings, prefix: str, count: int) -> tuple[float, int, float | None, float]:
    """Seconds for generate_codes end to end (and commit), the batch, and
    the CPU seconds of the backend and of this process (numpy included)."""
    engine = database.engine(settings)
    with engine.connect() as conn:
        pid = conn.connection.driver_connection.info.backend_pid  # the pool hands this one out again
    cpu, client = backend_cpu(pid), time.process_time()
    started = time.perf_counter()
    with Session(engine) as session, session.begin():
        assert session.connection().connection.driver_connection.info.backend_pid == pid
        batch_id = catalog.generate_codes(session, prefix, count).batch_id
    elapsed = time.perf_counter() - started
    server = _spent(pid, cpu)
    client = time.process_time() - client
    engine.dispose()
    return elapsed, batch_id, server, client


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


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
        prefixes = _prefixes(args.rounds + 1)
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
        with psycopg.connect(settings.database_url) as conn:
            conn.execute(PLAIN_TABLE)
        results = []
        for r in range(args.rounds):
            load = os.getloadavg()[0]
            gen_s, batch_id, gen_cpu, client_cpu = generate(settings, prefixes[r], args.count)
            plain_s, plain_cpu = plain_copy(settings.database_url, batch_id)
            result = {
                "generate_s": round(gen_s, 3),
                "plain_copy_s": round(plain_s, 3),
                "load_1min": round(load, 1),
                "generate_backend_cpu_s": _rounded(gen_cpu),
                "generate_client_cpu_s": round(client_cpu, 3),
                "plain_copy_backend_cpu_s": _rounded(plain_cpu),
            }
            results.append(result)
            print(
                f"round {r + 1} (load {load:.1f}): generate {args.count / gen_s:,.0f} codes/s"
                f" ({gen_s:.2f} s);"
                f" plain COPY of the same rows into a two-index table {args.count / plain_s:,.0f} rows/s"
                f" ({plain_s:.2f} s); ratio {plain_s / gen_s:.2f}",
                flush=True,
            )
            if gen_cpu is not None and plain_cpu is not None:
                print(
                    f"  CPU: generate's backend {gen_cpu:.2f} s + this process {client_cpu:.2f} s;"
                    f" plain COPY's backend {plain_cpu:.2f} s; backend ratio {plain_cpu / gen_cpu:.2f}",
                    flush=True,
                )
        with psycopg.connect(settings.database_url) as conn:
            total = conn.execute("SELECT count(*), count(DISTINCT code) FROM codes").fetchone()
        assert total == (args.rounds * args.count,) * 2, total
        profile = []
        if args.ablation:
            print(
                f"COPY of {args.ablation:,} sorted rows into codes ({total[0]:,} rows)"
                " as its parts are dropped:"
            )
            profile = ablation(settings.database_url, prefixes[-1], args.ablation)
        best_gen = min(r["generate_s"] for r in results)
        best_plain = min(r["plain_copy_s"] for r in results)
        summary = {
            "count": args.count,
            "generate_codes_per_s": round(args.count / best_gen),
            "plain_copy_rows_per_s": round(args.count / best_plain),
            "ratio_to_plain_copy": round(best_plain / best_gen, 2),
            "ratio_per_round": [round(r["plain_copy_s"] / r["generate_s"], 2) for r in results],
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
