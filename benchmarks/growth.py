"""PostgreSQL's cost per claim as the tables grow, on a private PostgreSQL
started with production-like settings.

    .venv/bin/python -m benchmarks.growth --claims 10000000 --window 1000000
    .venv/bin/python -m benchmarks.growth --claims 4000 --window 2000   # a smoke run (seconds)

The run starts its own PostgreSQL 15 (data directory under /tmp, its own
port) with settings sized for the machine (shared_buffers a sixth of RAM,
effective_cache_size two thirds, autovacuum on with scale factors for large
tables, spread checkpoints, synchronous_commit on), creates the schema
(``issuance db upgrade``), one activity whose pool holds a code for every
claim, vacuums and checkpoints it (a pool is generated ahead of its
campaign), then decides claims through the workers' own path
(``handle_claims``: batches of --batch claims from --threads threads, 5%
re-sends and 2% bad numbers). Per window of --window claims it records
claims/s, the CPU seconds of every process of the instance (read from /proc:
the backends, autovacuum, the checkpointer and the other helpers, and the
children that exited, through the postmaster's reaped-children times),
table and index sizes, WAL written and the autovacuum and autoanalyze runs
seen in pg_stat_user_tables. The report (JSON, rewritten after each window)
ends with the last window's cost per claim over the first's.

--max-minutes (counted from the start, set-up included) stops before a
window that would end past that time, judged by the last window's length, so
a run goes as far as the time allows; the report says where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
from issuance.shared.db import database
from issuance.shared.settings import PREFIX, Settings, settings_from
from issuance.shared.wire.messages import utcnow
from issuance.workers.handlers import handle_claims
from rich.console import Console
from rich.table import Table

from benchmarks.harness import machine_memory, private_postgres, production_settings
from benchmarks.pipeline import Workload, make_activity

console = Console(stderr=True)
TICK = os.sysconf("SC_CLK_TCK")
DB = "issuance_growth"


def _proc(pid: int) -> tuple[list[str], str]:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return stat, title.strip()


def role(title: str) -> str:
    """The kind of a PostgreSQL process, from its title."""
    if f" {DB} " in f" {title} ":
        return "backends"
    if "autovacuum" in title:
        return "autovacuum"
    return "background"  # checkpointer, background writer, WAL writer, stats, launcher's siblings


def cpu_by_pid(postmaster: int) -> dict[int, tuple[str, float]]:
    """(role, CPU seconds: user + system) of each live process of the
    instance; under pid 0, ``exited``: the CPU of the children the postmaster
    has reaped (autovacuum workers that came and went, backends that ended)."""
    stat, _ = _proc(postmaster)
    usage = {
        0: ("exited", (int(stat[13]) + int(stat[14])) / TICK),
        postmaster: ("postmaster", (int(stat[11]) + int(stat[12])) / TICK),
    }
    children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True, check=False)
    for pid in (int(p) for p in children.stdout.split()):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, IndexError):
            stat, title = _proc(pid)
            usage[pid] = (role(title), (int(stat[11]) + int(stat[12])) / TICK)
    return usage


Readings = dict[int, tuple[str, float]]


def cpu_between(before: Readings, after: Readings) -> dict[str, float]:
    """CPU seconds by role spent between two cpu_by_pid() readings. A process
    that ended in between moved its whole CPU time into the reaped children's
    total: what it had spent before the first reading is taken off there."""
    spent = {"postmaster": 0.0, "backends": 0.0, "autovacuum": 0.0, "background": 0.0, "exited": 0.0}
    for pid, (kind, cpu) in after.items():
        spent[kind] += cpu - before.get(pid, (kind, 0.0))[1]
    spent["exited"] -= sum(cpu for pid, (_, cpu) in before.items() if pid not in after)
    return spent


TABLES = """SELECT relname, pg_table_size(relid), pg_indexes_size(relid), n_live_tup, n_dead_tup,
                   autovacuum_count, autoanalyze_count, vacuum_count, analyze_count
              FROM pg_stat_user_tables ORDER BY pg_total_relation_size(relid) DESC"""


def snapshot(conn: psycopg.Connection[Any], postmaster: int) -> dict[str, Any]:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    tables = {
        name: {
            "table_mb": round(table / 2**20, 1),
            "indexes_mb": round(indexes / 2**20, 1),
            "live": live,
            "dead": dead,
            "autovacuum": av,
            "autoanalyze": aa,
            "vacuum": v,
            "analyze": a,
        }
        for name, table, indexes, live, dead, av, aa, v, a in conn.execute(TABLES).fetchall()
    }
    row = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
    bgw = conn.execute("SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter").fetchone()
    # Full-page images: the first change to a page after a checkpoint logs the
    # whole page, so their count per claim says how many distinct pages a
    # checkpoint interval touches.
    fpi = conn.execute("SELECT wal_fpi FROM pg_stat_wal").fetchone()
    return {
        "at": time.monotonic(),
        "cpu": cpu_by_pid(postmaster),
        "wal": float(row[0]) if row else 0.0,
        "checkpoints": int(bgw[0]) if bgw else 0,
        "fpi": int(fpi[0]) if fpi else 0,
        "tables": tables,
        "driver_cpu": sum(os.times()[:2]),
        "load": os.getloadavg(),
    }


class Driver:
    """The workers' claim decisions from ``threads`` threads, ``batch`` at a time."""

    def __init__(self, settings: Settings, slug: str, threads: int, batch: int, *, random_ids: bool) -> None:
        self.settings = settings
        self.workload = Workload(slug, seed=10, random_ids=random_ids)
        self.threads = threads
        self.batch = batch
        self.lock = threading.Lock()
        self.outcomes: dict[str, int] = {}

    def take(self, left: list[int]) -> list[Any]:
        with self.lock:
            count = min(self.batch, left[0])
            left[0] -= count
            claims = self.workload.take(count) if count else []
            # Re-sends are drawn from the last 1,000 claims: keep only those.
            del self.workload.sent[:-1000]
            return claims

    def run(self, pool: Any, count: int) -> None:
        left = [count]

        def work() -> None:
            while claims := self.take(left):
                outcomes = handle_claims(pool, self.settings, claims)
                with self.lock:
                    for outcome in outcomes:
                        key = outcome.status.value
                        self.outcomes[key] = self.outcomes.get(key, 0) + 1

        with ThreadPoolExecutor(self.threads) as executor:
            for future in [executor.submit(work) for _ in range(self.threads)]:
                future.result()


def window_row(start: int, count: int, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    seconds = after["at"] - before["at"]
    cpu = cpu_between(before["cpu"], after["cpu"])
    total = sum(cpu.values())
    runs = {
        kind: sum(t[kind] - before["tables"].get(n, {}).get(kind, 0) for n, t in after["tables"].items())
        for kind in ("autovacuum", "autoanalyze")
    }
    big = sorted(after["tables"].items(), key=lambda kv: -(kv[1]["table_mb"] + kv[1]["indexes_mb"]))[:5]
    return {
        "from": start,
        "to": start + count,
        "seconds": round(seconds, 1),
        "claims_per_s": round(count / seconds, 1),
        "pg_cpu_us_per_claim": round(total * 1e6 / count, 1),
        "pg_cpu_us_per_claim_by_role": {k: round(v * 1e6 / count, 1) for k, v in cpu.items()},
        "pg_cpu_cores": round(total / seconds, 2),
        "driver_cpu_us_per_claim": round((after["driver_cpu"] - before["driver_cpu"]) * 1e6 / count, 1),
        "wal_bytes_per_claim": round((after["wal"] - before["wal"]) / count),
        "full_page_images_per_claim": round((after["fpi"] - before["fpi"]) / count, 2),
        "checkpoints": after["checkpoints"] - before["checkpoints"],
        "autovacuum_runs": runs["autovacuum"],
        "autoanalyze_runs": runs["autoanalyze"],
        "load_average_end": [round(x, 2) for x in after["load"]],
        "largest_tables_mb": {n: {"table": t["table_mb"], "indexes": t["indexes_mb"]} for n, t in big},
        "tables_at_end": after["tables"],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    conf = production_settings(machine_memory(), os.cpu_count() or 2)
    if args.shared_buffers:
        conf["shared_buffers"] = args.shared_buffers
    report: dict[str, Any] = {
        "command": args.command,
        "started": utcnow().isoformat(),
        "claims_planned": args.claims,
        "window": args.window,
        "threads": args.threads,
        "batch": args.batch,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "windows": [],
    }
    out = args.out / f"growth-{time.strftime('%Y%m%d-%H%M%S')}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.max_minutes * 60 if args.max_minutes else None
    with private_postgres(conf, DB) as server:
        env = {f"{PREFIX}DATABASE_URL": server.url(), f"{PREFIX}PHONE_KEY": "benchmark-phone-key-growth"}
        settings = settings_from(env)
        database.upgrade(settings)
        with psycopg.connect(server.url(), autocommit=True) as conn:
            report["settings"] = {
                name: value
                for name, value in conn.execute(
                    "SELECT name, current_setting(name) FROM pg_settings"
                    " WHERE source NOT IN ('default', 'override') ORDER BY name"
                ).fetchall()
            }
            report["server_version"] = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
            report["huge_pages"] = server.huge_pages.as_json() if server.huge_pages else None
            console.print(f"[bold]private PostgreSQL[/] on port {server.port}: {report['settings']}")
            console.print(f"huge pages: {report['huge_pages']}")
            started = time.monotonic()
            slug = make_activity(settings, "growth", args.claims, args.claims)
            conn.execute("VACUUM ANALYZE")
            conn.execute("CHECKPOINT")
            report["setup_seconds"] = round(time.monotonic() - started, 1)
            console.print(f"{args.claims:,} codes generated, vacuumed: {report['setup_seconds']} s")
            driver = Driver(settings, slug, args.threads, args.batch, random_ids=args.random_ids)
            with database.pool(settings, min_size=args.threads, max_size=args.threads) as pool:
                before = snapshot(conn, server.postmaster())
                for start in range(0, args.claims, args.window):
                    count = min(args.window, args.claims - start)
                    driver.run(pool, count)
                    after = snapshot(conn, server.postmaster())
                    row = window_row(start, count, before, after)
                    report["windows"].append(row)
                    before = after
                    summary = {k: v for k, v in row.items() if k != "tables_at_end"}
                    console.print(summary)
                    report["outcomes"] = driver.outcomes
                    finish(report, args, stopped=None)
                    out.write_text(json.dumps(report, indent=2))
                    # Stop before a window that would end past the deadline.
                    ahead = time.monotonic() + 1.1 * row["seconds"] * args.window / count
                    if deadline is not None and ahead > deadline and start + count < args.claims:
                        finish(report, args, stopped=f"--max-minutes {args.max_minutes} reached")
                        break
            out.write_text(json.dumps(report, indent=2))
    report["report_path"] = str(out)
    return report


def finish(report: dict[str, Any], args: argparse.Namespace, stopped: str | None) -> None:
    windows = report["windows"]
    report["claims_run"] = windows[-1]["to"] if windows else 0
    report["stopped_early"] = stopped
    report["finished"] = utcnow().isoformat()
    if windows:
        first, last = windows[0]["pg_cpu_us_per_claim"], windows[-1]["pg_cpu_us_per_claim"]
        report["last_over_first"] = round(last / first, 3) if first else None
        report["backends_last_over_first"] = round(
            windows[-1]["pg_cpu_us_per_claim_by_role"]["backends"]
            / max(windows[0]["pg_cpu_us_per_claim_by_role"]["backends"], 1e-9),
            3,
        )
        report["target_met"] = report["last_over_first"] is not None and report["last_over_first"] <= 1.2


def table(report: dict[str, Any]) -> Table:
    out = Table(title="PostgreSQL CPU per claim by window (µs; all processes of the private instance)")
    for name in ("claims", "claims/s", "PG µs/claim", "backends", "autovacuum+exited", "background"):
        out.add_column(name, justify="right")
    for name in ("av runs", "WAL B/claim", "FPI/claim", "claims+codes MB"):
        out.add_column(name, justify="right")
    for w in report["windows"]:
        by = w["pg_cpu_us_per_claim_by_role"]
        sizes = w["tables_at_end"]
        mb = sum(
            sizes.get(t, {}).get("table_mb", 0) + sizes.get(t, {}).get("indexes_mb", 0)
            for t in ("claims", "codes")
        )
        out.add_row(
            f"{w['from']:,}-{w['to']:,}",
            f"{w['claims_per_s']:,.0f}",
            f"{w['pg_cpu_us_per_claim']:.1f}",
            f"{by['backends']:.1f}",
            f"{by['autovacuum'] + by['exited']:.1f}",
            f"{by['background'] + by['postmaster']:.1f}",
            f"{w['autovacuum_runs']}/{w['autoanalyze_runs']}",
            f"{w['wal_bytes_per_claim']:,}",
            f"{w['full_page_images_per_claim']:.2f}",
            f"{mb:,.0f}",
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--claims", type=int, default=10_000_000, help="claims in all (and codes in the pool)"
    )
    parser.add_argument("--window", type=int, default=1_000_000, help="claims per measured window")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument(
        "--max-minutes", type=float, default=0, help="stop at the first window boundary after"
    )
    parser.add_argument(
        "--random-ids",
        action="store_true",
        help="random (version 4) claim IDs instead of the page's time-ordered ones",
    )
    parser.add_argument("--shared-buffers", default="", help="override the sized shared_buffers, e.g. 128MB")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    args.command = " ".join(["python -m benchmarks.growth", *sys.argv[1:]])
    report = run(args)
    Console(width=150).print(table(report))
    Console().print(
        f"claims run: {report['claims_run']:,} of {report['claims_planned']:,}"
        f"{'; stopped: ' + report['stopped_early'] if report['stopped_early'] else ''};"
        f" last/first window PostgreSQL CPU per claim: {report.get('last_over_first')}"
        f" (backends alone {report.get('backends_last_over_first')}); results: {report['report_path']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
