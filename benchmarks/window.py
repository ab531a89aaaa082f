"""The delivery window against the sustained rate: the same open-loop run
with each worker process holding different numbers of unacknowledged
messages (``issuance worker --prefetch``), in one database, A and B taking
turns (A B B A ...) so that neither gets the younger tables.

    .venv/bin/python -m benchmarks.window --prefetch 32,128 --rounds 2
    .venv/bin/python -m benchmarks.window --prefetch 32,128 --rounds 1 --backlog 5000 --seconds 3   # smoke

A claim message stays unacknowledged until its claims have committed, so
the window bounds the claims a process can gather into its group commits.
The run first drains a backlog of --backlog claims with the default window
(its rate is the reference: the offered rate is --fraction of it), then per
arm starts the workers with that window, offers claims for --seconds and
waits until they are decided, then offers half the rate for half as long
(the latency point). Same workload as ``benchmarks.pipeline`` (5% re-sends,
2% bad numbers, 200 claims per message at most) on a private PostgreSQL
with production-like settings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import psycopg
from issuance.shared.settings import Settings
from rich.console import Console
from rich.table import Table

from benchmarks.harness import ResourceMeter, WorkerProcesses
from benchmarks.pipeline import Workload, backlog_drain, make_activity, new_results, open_loop, services

console = Console(stderr=True)


def arm(
    settings: Settings, env: dict[str, str], workload: Workload, prefetch: int, rate: float, args: Any
) -> dict[str, Any]:
    """One arm: the workers with ``prefetch``, the sustained rate, then half of it."""
    workers = WorkerProcesses(
        {**env, "dramatiq_queue_prefetch": str(prefetch)},
        args.processes,
        args.threads,
        args.out / "workers.log",
    )
    meter = ResourceMeter(workers)
    try:
        with psycopg.connect(settings.database_url) as conn:
            time.sleep(3)  # let the workers connect before offering load
            meter.start()
            sustained = open_loop(settings, conn, workload, rate, args.seconds, args)
            sustained.update(meter.stop())
            half = open_loop(settings, conn, workload, rate / 2, args.seconds / 2, args)
    finally:
        workers.stop()
    return {"prefetch": prefetch, "sustained": sustained, "half": half}


def run(args: argparse.Namespace) -> dict[str, Any]:
    results = new_results(args)
    with services(args, results) as (settings, env):
        arms = args.rounds * len(args.prefetch)
        pool = args.backlog + int(arms * 1.6 * args.seconds * 6_000) + 100_000
        live = make_activity(settings, "bench-live", pool, pool)
        console.print(f"[bold]backlog[/] of {args.backlog} claims, default window")
        results["backlog"] = backlog_drain(settings, env, live, args.backlog, args, batched=True)
        rate = args.fraction * results["backlog"]["claims_per_s"]
        console.print(results["backlog"])
        workload = Workload(live, seed=7)
        order = [
            p for n in range(args.rounds) for p in (args.prefetch if n % 2 == 0 else args.prefetch[::-1])
        ]
        results["arms"] = []
        for prefetch in order:
            console.print(f"[bold]window {prefetch}[/]: {args.seconds:.0f} s at {rate:.0f}/s, then half")
            results["arms"].append(arm(settings, env, workload, prefetch, rate, args))
            console.print(results["arms"][-1])
        with psycopg.connect(settings.database_url) as conn:
            from issuance.shared.db.verify import verify

            results["verify"] = verify(conn).as_json()
    return results


def summarise(results: dict[str, Any]) -> Table:
    table = Table(title="sustained open loop by delivery window (medians over the rounds)")
    for column in (
        "prefetch",
        "offered/s",
        "decided/s",
        "ratio to drain",
        "drained after s",
        "p99 at half (client)",
        "cores",
    ):
        table.add_column(column, justify="right")
    drain = results["backlog"]["claims_per_s"]
    for prefetch in dict.fromkeys(a["prefetch"] for a in results["arms"]):
        mine = [a for a in results["arms"] if a["prefetch"] == prefetch]

        def med(pick: Any, arms: list[dict[str, Any]] = mine) -> float:
            return float(statistics.median(pick(a) for a in arms))

        decided = med(lambda a: a["sustained"]["throughput"])
        cores = med(
            lambda a: sum(
                v
                for k, v in a["sustained"].items()
                if k.endswith("_cpu_cores") and k != "postgresql_autovacuum_cpu_cores"
            )
        )
        table.add_row(
            str(prefetch),
            f"{med(lambda a: a['sustained']['offered_rate']):,.0f}",
            f"{decided:,.0f}",
            f"{decided / drain:.2f}",
            f"{med(lambda a: a['sustained']['drain_after_s']):.1f}",
            f"{med(lambda a: a['half'].get('observed_p99_ms') or 0):,.0f} ms",
            f"{cores:.2f}",
        )
    return table


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prefetch", type=lambda s: [int(x) for x in s.split(",")], default=[32, 128])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--fraction", type=float, default=0.8, help="offered rate as a fraction of the drain")
    parser.add_argument("--seconds", type=float, default=40.0, help="seconds of each arm's sustained run")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--postgres", choices=("private", "shared"), default="private")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    results = run(args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = args.out / f"window-{stamp}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    Console().print(summarise(results))
    Console().print(f"results: {path}; verify clean: {results['verify']['clean']}")
    return 0 if results["verify"]["clean"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
