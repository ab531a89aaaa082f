"""The cells benchmark: claims/s drained by 1, 2 and 3 cells in one run on
this box, and the routing overhead of the cell layer.

    .venv/bin/python -m benchmarks.cells            # the full run (a few minutes)
    .venv/bin/python -m benchmarks.cells --quick    # a smoke run

Each phase gets fresh cells (a private database and vhost each, on the
shared PostgreSQL and RabbitMQ) and an activity in every cell whose budget
and code pool cover every claim. A backlog of claims (5% re-sent, 2% bad
numbers, as in benchmarks.pipeline) is published with no worker running;
then each cell's workers start (``--processes`` x ``--threads`` per cell)
and the drain is timed per cell, from its first claim decided.

Phases:
  direct    one deployment, no cell map: today's path (RabbitPublisher, plain workers).
  layer     one cell through the cell layer: the routing publisher
            (publisher_for with ISSUANCE_CELLS) and workers that check
            every claim's cell (ISSUANCE_CELL). direct and layer alternate
            ``--repeats`` times; the overhead is the ratio of their medians.
  cells-2, cells-3  two and three cells, each with its own workers.

One box cannot show a speed-up: every cell's database, broker vhost and
workers share its cores. The per-cell rate is each cell's claims over its
own drain; the projection to N boxes is printed as arithmetic on the
1-cell rate and labelled so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from issuance.shared.cellmap import load_cell_map
from issuance.shared.settings import PREFIX, Settings, settings_from
from issuance.shared.wire.cells import CellRouter, publisher_for
from issuance.shared.wire.messages import utcnow
from issuance.shared.wire.publisher import RabbitPublisher
from rich.console import Console

from benchmarks.harness import WorkerProcesses, private_services
from benchmarks.pipeline import Workload, decided, make_activity

console = Console(stderr=True)
# Seconds between looks at the cells' claim counts (the drain times' resolution).
POLL = 0.2


@contextlib.contextmanager
def fresh_cells(count: int) -> Iterator[list[tuple[Settings, dict[str, str]]]]:
    tag = f"issuance_cells_{uuid.uuid4().hex[:6]}"
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(private_services(f"{tag}_{i}")) for i in range(count)]


def cell_map(cells: list[tuple[Settings, dict[str, str]]]) -> str:
    return json.dumps(
        [
            {
                "name": f"c{number}",
                "number": number,
                "database_url": settings.database_url,
                "amqp_url": settings.amqp_url,
                "redis_url": settings.redis_url,
            }
            for number, (settings, _) in enumerate(cells)
        ]
    )


def drain(count: int, cells_count: int, args: argparse.Namespace, *, layer: bool) -> dict[str, Any]:
    """Publish ``count`` claims over ``cells_count`` fresh cells, then time
    each cell's drain."""
    with fresh_cells(cells_count) as cells:
        slug = f"cells-{uuid.uuid4().hex[:6]}"
        for settings, _ in cells:
            make_activity(settings, slug, count, count)
        the_map = cell_map(cells)
        workload = Workload(slug, seed=count + cells_count)
        claims = workload.take(count)
        started = time.monotonic()
        if layer:
            operator = settings_from({**cells[0][1], f"{PREFIX}CELLS": the_map})
            with publisher_for(operator) as publisher:  # the routing publisher
                publisher.publish_claims(claims, batch=args.batch)
        else:
            with RabbitPublisher.from_settings(cells[0][0]) as publisher:
                publisher.publish_claims(claims, batch=args.batch)
        published = time.monotonic() - started
        # Each cell's share (messages, and unique claims to wait for), by the publisher's routing.
        mapped = settings_from({**cells[0][1], f"{PREFIX}CELLS": the_map})
        routing = CellRouter(load_cell_map(mapped), mapped.default_region)
        unique = {c.claim_id: c for c in workload.sent}
        share, messages = [0] * cells_count, [0] * cells_count
        for claim in unique.values():
            share[int(routing.phone_cell(claim.phone)[1:])] += 1
        for claim in claims:
            messages[int(routing.phone_cell(claim.phone)[1:])] += 1
        workers = []
        try:
            for number, (_, env) in enumerate(cells):
                extra = {f"{PREFIX}CELLS": the_map, f"{PREFIX}CELL": f"c{number}"} if layer else {}
                log = args.out / f"cells-workers-{number}.log"
                workers.append(WorkerProcesses({**env, **extra}, args.processes, args.threads, log))
            per_cell = watch(cells, slug, share, args.timeout, workers)
        finally:
            for worker in workers:
                worker.stop()
    total_seconds = max(c["seconds_from_start"] for c in per_cell)
    first = min(c["first_decided_at"] for c in per_cell)
    last = max(c["done_at"] for c in per_cell)
    return {
        "cells": cells_count,
        "path": "cell layer" if layer else "direct",
        "messages": count,
        "unique_claims": len(unique),
        "publish_seconds": round(published, 2),
        "published_per_s": round(count / published, 1),
        "seconds_with_start": round(total_seconds, 2),
        "claims_per_s": round(count / max(last - first, POLL), 1),
        "per_cell": [
            {
                "cell": f"c{number}",
                "messages": messages[number],
                "unique_claims": c["claims"],
                "draining_seconds": round(c["done_at"] - c["first_decided_at"], 2),
                "claims_per_s": round(messages[number] / max(c["done_at"] - c["first_decided_at"], POLL), 1),
            }
            for number, c in enumerate(per_cell)
        ],
    }


def watch(
    cells: list[tuple[Settings, dict[str, str]]],
    slug: str,
    share: list[int],
    timeout: float,
    workers: list[WorkerProcesses],
) -> list[dict[str, Any]]:
    """Poll every cell until its share of the claims is decided and credited."""
    start = time.monotonic()
    state: list[dict[str, Any]] = [
        {"claims": n, "first_decided_at": None, "done_at": None, "seconds_from_start": None} for n in share
    ]
    conns = [psycopg.connect(settings.database_url) for settings, _ in cells]
    try:
        while any(s["done_at"] is None for s in state):
            asked = time.monotonic()
            for conn, s in zip(conns, state, strict=True):
                if s["done_at"] is not None:
                    continue
                done = decided(conn, slug)
                if done and s["first_decided_at"] is None:
                    s["first_decided_at"] = asked
                if done >= s["claims"]:
                    s["done_at"] = asked
                    s["seconds_from_start"] = asked - start
            if asked - start > timeout or any(w.proc.poll() is not None for w in workers):
                raise TimeoutError(f"cells not drained after {asked - start:.0f}s: {state}")
            time.sleep(POLL)
    finally:
        for conn in conns:
            conn.close()
    return state


def run(args: argparse.Namespace) -> dict[str, Any]:
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "started": utcnow().isoformat(),
        "overhead": [],
    }
    # direct and layer alternate, so a neighbour's load falls on both alike.
    for repeat in range(args.repeats):
        for layer in (False, True):
            label = "layer" if layer else "direct"
            console.print(f"[bold]{label}[/] #{repeat + 1}: {args.claims} claims, one cell")
            point = drain(args.claims, 1, args, layer=layer)
            console.print(point)
            results["overhead"].append(point)
    direct = statistics.median(p["claims_per_s"] for p in results["overhead"] if p["path"] == "direct")
    layered = statistics.median(p["claims_per_s"] for p in results["overhead"] if p["path"] != "direct")
    results["layer_over_direct"] = round(layered / direct, 3)
    results["cells"] = {}
    for count in (2, 3):
        console.print(f"[bold]cells-{count}[/]: {args.claims * count} claims")
        results["cells"][str(count)] = drain(args.claims * count, count, args, layer=True)
        console.print(results["cells"][str(count)])
    results["per_cell_rate_1"] = layered
    results["finished"] = utcnow().isoformat()
    return results


def summary(results: dict[str, Any]) -> list[str]:
    one = round(results["per_cell_rate_1"])
    lines = [
        "| cells | claims | drain claims/s (all cells) | per-cell claims/s |",
        "|---|---|---|---|",
        f"| 1 (cell layer, median) | {results['args']['claims']} | {one:.0f} | {one:.0f} |",
    ]
    for count, point in results["cells"].items():
        rates = ", ".join(f"{c['cell']} {c['claims_per_s']:.0f}" for c in point["per_cell"])
        lines.append(f"| {count} | {point['messages']} | {point['claims_per_s']:.0f} | {rates} |")
    direct = [p["claims_per_s"] for p in results["overhead"] if p["path"] == "direct"]
    layer = [p["claims_per_s"] for p in results["overhead"] if p["path"] != "direct"]
    lines += [
        "",
        f"direct path drains: {', '.join(f'{r:.0f}' for r in direct)} claims/s;"
        f" cell layer: {', '.join(f'{r:.0f}' for r in layer)} claims/s;"
        f" layer / direct (medians) = {results['layer_over_direct']:.3f}",
        "",
        "Projection (arithmetic, not a measurement): N boxes, one cell each,"
        f" each draining like this box's one cell = N x {one:.0f} claims/s:"
        + "".join(f" {n} -> {n * one:,.0f};" for n in (2, 3, 10)),
    ]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run (a few thousand claims)")
    parser.add_argument("--claims", type=int, default=30_000, help="claims per cell in each phase")
    parser.add_argument("--repeats", type=int, default=2, help="direct/layer pairs for the overhead")
    parser.add_argument("--processes", type=int, default=1, help="worker processes per cell")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=200, help="claims per claims-requested message")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    if args.quick:
        args.claims, args.repeats = 3_000, 1
    results = run(args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = args.out / f"cells-{stamp}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print("\n".join(summary(results)))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
