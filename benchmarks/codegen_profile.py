"""Where a COPY of generated codes spends its time: the same sorted rows
into ``codes`` and into the benchmark's plain two-index table, in text and in
binary format, each into an empty table of a fresh private database.

    .venv/bin/python -m benchmarks.codegen_profile --count 1000000 --perf /tmp/codegen-perf

Prints, per COPY, the wall time, the backend's CPU seconds (from /proc) and
the WAL it wrote; with ``--perf DIR`` it also records each backend with
``perf record -g`` and prints the CPU seconds of the executor's parts (the
B-tree inserts, the statement trigger, the CHECK constraints, the rest of
the index work, the heap insert) from the samples.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from issuance.shared import domain
from issuance.shared.backoffice import catalog
from issuance.shared.db import database
from issuance.shared.settings import settings_from
from sqlalchemy.orm import Session

from benchmarks.codegen import ADMIN_DSN, PLAIN_TABLE, backend_cpu

# perf's symbols and the part of the COPY each one stands for (inclusive
# time, so a part's children are in it).
PARTS = {
    "CopyFrom": "the whole COPY",
    "btinsert": "B-tree inserts (primary key, pool index)",
    "ExecInsertIndexTuples": "index work (B-tree inserts and partial-index predicates)",
    "ExecARInsertTriggers": "trigger: keeping each row for the statement check",
    "AfterTriggerEndQuery": "trigger: the statement check",
    "ExecConstraints": "CHECK constraints",
    "heap_multi_insert": "heap insert",
    "NextCopyFrom": "parsing the rows",
}


def _binary(codes: list[str], template_id: int, batch_id: int) -> bytes:
    head = struct.pack("!hi", 3, len(codes[0]))
    tail = struct.pack("!iiii", 4, template_id, 4, batch_id)
    rows = b"".join(head + c.encode() + tail for c in codes)
    return b"PGCOPY\n\xff\r\n\x00" + bytes(8) + rows + b"\xff\xff"


@contextlib.contextmanager
def _perf(pid: int, out: Path | None) -> Iterator[None]:
    if out is None:
        yield
        return
    recorder = subprocess.Popen(
        ["perf", "record", "-F", "499", "-g", "-o", str(out), "-p", str(pid)], stderr=subprocess.DEVNULL
    )
    time.sleep(1)
    try:
        yield
    finally:
        recorder.send_signal(signal.SIGINT)
        recorder.wait()


def _parts(recording: Path) -> dict[str, float]:
    """CPU seconds of each part, from the samples' inclusive shares."""
    report = subprocess.run(
        ["perf", "report", "-i", str(recording), "--children", "--sort", "symbol", "--stdio", "-g", "none"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    total = next(int(line.rsplit(":", 1)[1]) / 1e9 for line in report.splitlines() if "Event count" in line)
    shares: dict[str, float] = {}
    for line in report.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0].endswith("%") and fields[3] in PARTS:
            shares[fields[3]] = float(fields[0].rstrip("%")) / 100 * total
    return shares


def _setup(url: str) -> tuple[int, int]:
    settings = settings_from({"ISSUANCE_DATABASE_URL": url})
    database.upgrade(settings)
    now = datetime.now(UTC)
    engine = database.engine(settings)
    with Session(engine) as session, session.begin():
        catalog.create_channel(session, "profile")
        spec = {
            "slug": "profile",
            "title": "profile",
            "channel": "profile",
            "starts_at": now,
            "ends_at": now + timedelta(days=1),
            "budget": 0,
            "templates": [{"prefix": "PRF", "kind": "gift", "value": 100}],
        }
        catalog.create_activity(session, catalog.ActivitySpec.from_mapping(spec))
    engine.dispose()
    with psycopg.connect(url) as conn:
        conn.execute(PLAIN_TABLE)
        template_id = conn.execute("SELECT template_id FROM coupon_templates").fetchone()[0]
        batch_id = conn.execute(
            "INSERT INTO code_batches (template_id, size) VALUES (%s, 0) RETURNING batch_id", (template_id,)
        ).fetchone()[0]
    return template_id, batch_id


def _copy(url: str, table: str, fmt: str, data: bytes, perf_dir: Path | None) -> None:
    with psycopg.connect(url) as conn:
        if table == "codes":
            conn.execute(f"SET work_mem = '{catalog.CHECKED_ROWS_MEMORY}'")  # as generate_codes does
        pid = conn.info.backend_pid
        recording = None if perf_dir is None else perf_dir / f"{table}-{fmt}.perf"
        with _perf(pid, recording):
            wal = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]
            cpu = backend_cpu(pid)
            started = time.perf_counter()
            sql = f"COPY {table} (code, template_id, batch_id) FROM STDIN (FORMAT {fmt})"
            with conn.cursor().copy(sql) as copy:
                copy.write(data)
            elapsed = time.perf_counter() - started
            spent = backend_cpu(pid)
            wal_mb = conn.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s::pg_lsn) / 1e6", (str(wal),)
            ).fetchone()[0]
        conn.rollback()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"VACUUM {table}")
    used = "?" if cpu is None or spent is None else f"{spent - cpu:.2f} s"
    print(
        f"{table:12} {fmt:6} wall {elapsed:6.2f} s  backend CPU {used}  WAL {wal_mb:5.0f} MB"
        f"  load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    if recording is not None:
        for symbol, seconds in _parts(recording).items():
            print(f"    {PARTS[symbol]:60} {seconds:5.2f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--perf", type=Path, default=None, help="record each backend with perf into DIR")
    args = parser.parse_args()
    if args.perf is not None:
        args.perf.mkdir(parents=True, exist_ok=True)
    tag = f"issuance_bench_codegen_profile_{secrets.token_hex(3)}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{tag}"')
    try:
        url = f"postgresql://postgres@127.0.0.1:5432/{tag}"
        template_id, batch_id = _setup(url)
        block = domain.sorted_code_block("PRF", args.count)
        text_rows = catalog._rows(block, f"\t{template_id}\t{batch_id}\n".encode())
        binary_rows = _binary(catalog._codes_of(block), template_id, batch_id)
        for table in ("codes", "plain_codes"):
            for fmt, data in (("text", text_rows), ("binary", binary_rows)):
                _copy(url, table, fmt, data, args.perf)
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{tag}" WITH (FORCE)')


if __name__ == "__main__":
    main()
