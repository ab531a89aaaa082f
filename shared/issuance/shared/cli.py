"""The ``issuance`` command: schema, back office, publishing, workers,
verification and the embedded demo. ``issuance --help`` lists everything."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from issuance.shared.settings import Settings, SettingsError, load_settings
from issuance.shared.wire.messages import PUBLIC_TYPES

log = logging.getLogger("issuance")


def _session(settings: Settings) -> Any:
    from issuance.shared.db import database
    from sqlalchemy.orm import Session

    return Session(database.engine(settings))


def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    from issuance.shared.db import database

    database.upgrade(settings, args.revision)
    print(f"database at {args.revision}")
    return 0


def _lines(path: str) -> Iterator[bytes]:
    with open(path, "rb") if path != "-" else sys.stdin.buffer as handle:
        for line in handle:
            if line.strip():
                yield line


def cmd_publish(args: argparse.Namespace, settings: Settings) -> int:
    """Replay or backfill a JSON-lines file, one payload per line."""
    from issuance.shared.errors import InvalidMessage
    from issuance.shared.wire.codec import parse_line
    from issuance.shared.wire.publisher import RabbitPublisher
    from rich.progress import Progress

    good, bad = [], 0
    for number, line in enumerate(_lines(args.file), start=1):
        try:
            good.append(parse_line(args.type, line))
        except InvalidMessage as exc:
            bad += 1
            print(f"line {number}: refused, {exc}", file=sys.stderr)
    with (
        RabbitPublisher.from_settings(settings) as publisher,
        Progress(disable=not sys.stderr.isatty()) as bar,
    ):
        task = bar.add_task(f"publishing {args.type}", total=len(good))
        for start in range(0, len(good), 1000):
            bar.advance(task, publisher.publish_many(good[start : start + 1000]))
    print(f"published {len(good)} {args.type} messages; refused {bad} lines")
    return 1 if bad else 0


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    from datetime import timedelta

    import psycopg
    from issuance.shared.db.verify import verify

    with psycopg.connect(settings.database_url) as conn:
        report = verify(conn, grace=timedelta(seconds=settings.reconcile_grace_seconds))
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print("counts: " + ", ".join(f"{k}={v}" for k, v in report.counts.items()))
        print("refused: " + (", ".join(f"{k}={v}" for k, v in report.refusals.items()) or "none"))
        for name, rows in report.breaches.items():
            if rows:
                print(f"BREACH {name}: {len(rows)} e.g. {rows[:3]}")
        print("verify: clean" if report.clean else "verify: BREACHES FOUND")
    return 0 if report.clean else 1


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """Run the actors under Dramatiq's CLI (which forks the processes)."""
    argv = [
        "dramatiq",
        "issuance.workers.actors",
        "--processes",
        str(args.processes),
        "--threads",
        str(args.threads),
    ]
    if args.queues:
        argv += ["--queues", *args.queues]
    # Worker processes count into files here; /metrics on the metrics port adds them up.
    default_dir = Path(tempfile.gettempdir()) / f"issuance-metrics-{settings.metrics_port}"
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(default_dir))
    os.execvp(sys.executable, [sys.executable, "-m", *argv])  # noqa: S606  # nosec B606 - replaces this process


def cmd_schemas(args: argparse.Namespace, settings: Settings) -> int:
    from issuance.shared.wire.messages import MESSAGE_TYPES

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, message_type in MESSAGE_TYPES.items():
        path = out / f"{name}.v{message_type.VERSION}.json"
        path.write_text(json.dumps(message_type.json_schema(), indent=2) + "\n")
        print(path)
    return 0


def cmd_dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    from issuance.shared.db import database
    from issuance.workers import dead_letters

    with database.pool(settings, max_size=2) as pool:
        if args.sub == "drain":
            print(f"moved {dead_letters.drain(settings, pool)} messages from the .XQ queues")
        elif args.sub == "replay":
            chosen = dead_letters.Selection(
                ids=args.id or (),
                reason=args.reason,
                queue=args.queue,
                since=_instant(args.since),
                until=_instant(args.until),
            )
            result = dead_letters.replay(settings, pool, chosen)
            for dead_letter_id, why in result.skipped.items():
                print(f"not replayed {dead_letter_id}: {why}", file=sys.stderr)
            print(f"replayed {len(result.replayed)}: {result.replayed}")
            return 1 if result.skipped else 0
        else:
            with pool.connection() as conn:
                print("\n".join(dead_letters.listing(conn, args.limit)))
    return 0


def _instant(value: str | None) -> Any:
    """An RFC 3339 instant from the command line (the what-if clock)."""
    from datetime import UTC, datetime

    if value is None:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def cmd_sweep(args: argparse.Namespace, settings: Settings) -> int:
    from datetime import timedelta

    from issuance.workers.sweeper import default_grace, run_sweeper, sweep

    grace = timedelta(seconds=args.grace) if args.grace is not None else default_grace(settings)
    if args.command == "sweeper":
        run_sweeper(settings, interval=args.interval, grace=grace)
        return 0
    result = sweep(settings, now=_instant(args.now), grace=grace, limit=args.limit)
    p = result.promise
    print(
        f"overdue for credit: {result.found}, re-sent: {result.requeued}; uncredited: {p.uncredited},"
        f" oldest {p.oldest_age_seconds:.0f}s, overdue {p.overdue}, at risk 1h {p.at_risk_1h},"
        f" 6h {p.at_risk_6h}"
    )
    return 0


def cmd_exporter(args: argparse.Namespace, settings: Settings) -> int:
    from issuance.workers.exporter import run_exporter

    run_exporter(
        settings,
        port=args.port,
        interval=args.interval,
        campaign_interval=args.campaign_interval,
        now=_instant(args.now),
    )
    return 0


def cmd_chart(args: argparse.Namespace, settings: Settings) -> int:
    import psycopg
    from issuance.shared.backoffice.charts import load_series, render

    with psycopg.connect(settings.database_url) as conn:
        series = load_series(
            conn, activity=args.activity, since=_instant(args.since), until=_instant(args.until)
        )
    if not series.times:
        print("no granted claims match", file=sys.stderr)
        return 1
    path = render(series, args.out, promise_seconds=settings.credit_promise_seconds)
    print(f"chart of {series.claimed[-1]} claims written to {path}")
    return 0


def cmd_web(args: argparse.Namespace, settings: Settings) -> int:
    """Serve the activity page under uvicorn."""
    import uvicorn

    uvicorn.run(
        "issuance.producers.web:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        access_log=not args.no_access_log,
        proxy_headers=True,
        forwarded_allow_ips=args.forwarded_allow_ips,
    )
    return 0


def cmd_outbox_relay(args: argparse.Namespace, settings: Settings) -> int:
    """Publish the pending rows of an order system's outbox table."""
    from issuance.producers.outbox import relay_forever

    relay_forever(args.dsn or settings.database_url, settings, batch=args.batch, table=args.table)
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from issuance.workers.demo import run_demo

    return run_demo(claims=args.claims, embedded=args.embedded)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="issuance", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    up = db.add_parser("upgrade", help="apply the Alembic migrations")
    up.add_argument("revision", nargs="?", default="heads")
    up.set_defaults(func=cmd_db_upgrade)

    from issuance.shared.backoffice import commands

    commands.register(sub)

    publish = sub.add_parser("publish", help="publish a JSON-lines file of payloads")
    publish.add_argument("type", choices=PUBLIC_TYPES)
    publish.add_argument("--file", required=True, help="path, or - for standard input")
    publish.set_defaults(func=cmd_publish)

    verify = sub.add_parser("verify", help="check every invariant; non-zero exit on a breach")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=cmd_verify)

    worker = sub.add_parser("worker", help="run the Dramatiq workers")
    worker.add_argument("--processes", type=int, default=2)
    worker.add_argument("--threads", type=int, default=8)
    worker.add_argument("--queues", nargs="*")
    worker.set_defaults(func=cmd_worker)

    schemas = sub.add_parser("schemas", help="write the JSON Schema of every message")
    schemas.add_argument("--out", default="shared/issuance/shared/wire/schemas")
    schemas.set_defaults(func=cmd_schemas)

    dead = sub.add_parser("dead-letters", help="messages that could not be used, with reasons")
    dead.add_argument("sub", choices=["list", "drain", "replay"])
    dead.add_argument("--limit", type=int, default=50)
    dead.add_argument("--id", type=int, action="append", help="replay: this dead letter (repeatable)")
    dead.add_argument("--reason", help="replay: dead letters with this reason")
    dead.add_argument("--queue", help="replay: dead letters from this queue")
    dead.add_argument("--since", help="replay: stored at or after this RFC 3339 instant")
    dead.add_argument("--until", help="replay: stored before this RFC 3339 instant")
    dead.set_defaults(func=cmd_dead_letters)

    for name, text in (
        ("sweep", "re-send the credit of claims bound but not credited after a grace period (one pass)"),
        ("sweeper", "sweep every --interval seconds"),
    ):
        sweeper = sub.add_parser(name, help=text)
        sweeper.add_argument(
            "--grace",
            type=float,
            help="seconds after binding (default: half ISSUANCE_RECONCILE_GRACE_SECONDS)",
        )
        sweeper.add_argument("--limit", type=int, default=5000, help="claims per pass")
        sweeper.add_argument("--interval", type=float, default=30)
        sweeper.add_argument("--now", help="evaluate at this RFC 3339 instant instead of the clock")
        sweeper.set_defaults(func=cmd_sweep)

    exporter = sub.add_parser("exporter", help="serve campaign and promise gauges read from PostgreSQL")
    exporter.add_argument("--port", type=int, default=9192)
    exporter.add_argument("--interval", type=float, default=30, help="seconds between readings")
    exporter.add_argument(
        "--campaign-interval",
        type=float,
        help="seconds between campaign readings (default: max(2 x interval, 60))",
    )
    exporter.add_argument("--now", help="evaluate the promise as if the clock read this RFC 3339 instant")
    exporter.set_defaults(func=cmd_exporter)

    chart = sub.add_parser("chart", help="PNG chart: claims, credits, backlog and latency percentiles")
    chart.add_argument("--activity", help="the activity's slug (default: every activity)")
    chart.add_argument("--since", help="RFC 3339 start of the window (a benchmark run)")
    chart.add_argument("--until", help="RFC 3339 end of the window")
    chart.add_argument("--out", required=True, help="the PNG file to write")
    chart.set_defaults(func=cmd_chart)

    web = sub.add_parser("web", help="serve the activity page (claims and their status)")
    web.add_argument("--host", default="127.0.0.1")
    web.add_argument("--port", type=int, default=8000)
    web.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    web.add_argument("--no-access-log", action="store_true")
    web.add_argument(
        "--forwarded-allow-ips", default="127.0.0.1", help="proxies whose X-Forwarded-For is trusted"
    )
    web.set_defaults(func=cmd_web)

    relay = sub.add_parser("outbox-relay", help="publish an order system's transactional outbox")
    relay.add_argument("--dsn", help="the order system's database (default: ISSUANCE_DATABASE_URL)")
    relay.add_argument("--table", default="issuance_outbox")
    relay.add_argument("--batch", type=int, default=500)
    relay.set_defaults(func=cmd_outbox_relay)

    demo = sub.add_parser("demo", help="run the pipeline end to end and print a summary")
    demo.add_argument("--claims", type=int, default=3000)
    demo.add_argument(
        "--embedded",
        choices=["auto", "yes", "no"],
        default="auto",
        help="embedded PostgreSQL/Redis and the in-process broker (auto: unless service URLs are set)",
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        settings = load_settings()
        return int(args.func(args, settings))
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # BackOfficeError and friends: an operator's mistake
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
