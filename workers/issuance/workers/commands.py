"""The workers' ``issuance`` subcommands: worker, sweep, sweeper,
dead-letters, exporter and demo.

The ``issuance.commands`` entry point ``workers`` names :func:`register`;
``issuance.shared.cli`` finds it there, so the shared layer never imports
this package.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

from issuance.shared.cli import Subparsers, instant, positive
from issuance.shared.settings import Settings


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """Run Dramatiq's main process here: it forks the worker processes, the
    metrics fork and the sweeper fork, which inherit this process's logging
    set-up and the worker group's name and metrics port."""
    import dramatiq.cli
    import dramatiq.worker
    from issuance.shared.settings import PREFIX, load_settings
    from issuance.workers.process import group_name, set_title

    argv = ["issuance.workers.actors", "--processes", str(args.processes), "--threads", str(args.threads)]
    if args.queues:
        argv += ["--queues", *args.queues]
    if args.verbose or settings.log_level.upper() == "DEBUG":
        argv.append("--verbose")
    group = group_name(settings, args.queues)
    os.environ[f"{PREFIX}WORKER_GROUP"] = group
    if args.metrics_port is not None:
        os.environ[f"{PREFIX}METRICS_PORT"] = str(args.metrics_port)
    # The delivery window. Dramatiq reads it from its environment when it is
    # imported (which it has been by now) into this module constant; the
    # worker processes it forks take the constant's value.
    dramatiq.worker.QUEUE_PREFETCH = args.prefetch or 2 * args.threads
    # Worker processes count into files here; the metrics fork adds them up.
    # One directory per group: two groups on one host must not add up each other's.
    default_dir = Path(tempfile.gettempdir()) / f"issuance-metrics-{group}"
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(default_dir))
    load_settings.cache_clear()  # the forks read the group and the port from the environment
    set_title("main", load_settings())
    parser = dramatiq.cli.make_argument_parser()  # type: ignore[no-untyped-call]
    return int(dramatiq.cli.main(parser.parse_args(argv)))  # type: ignore[no-untyped-call]


def cmd_dead_letters_list(args: argparse.Namespace, settings: Settings) -> int:
    import psycopg
    from issuance.shared.db.dead_letters import listing

    with psycopg.connect(settings.database_url) as conn:
        for line in listing(conn, args.limit):
            print(line)
    return 0


def cmd_dead_letters_drain(args: argparse.Namespace, settings: Settings) -> int:
    from issuance.shared.db import database
    from issuance.shared.db.dead_letters import drain

    with database.pool(settings, max_size=2) as pool:
        print(f"moved {drain(settings, pool)} messages from the .XQ queues")
    return 0


def cmd_dead_letters_replay(args: argparse.Namespace, settings: Settings) -> int:
    from issuance.shared.db import database
    from issuance.shared.db.dead_letters import Selection, replay

    chosen = Selection(
        ids=args.id or (), reason=args.reason, queue=args.queue, since=args.since, until=args.until
    )
    with database.pool(settings, max_size=2) as pool:
        result = replay(settings, pool, chosen)
    for dead_letter_id, why in result.skipped.items():
        print(f"not replayed {dead_letter_id}: {why}", file=sys.stderr)
    print(f"replayed {len(result.replayed)}: {result.replayed}")
    return 1 if result.skipped else 0


def _grace(args: argparse.Namespace, settings: Settings) -> timedelta:
    from issuance.workers.sweeper import default_grace

    return timedelta(seconds=args.grace) if args.grace is not None else default_grace(settings)


def cmd_sweep(args: argparse.Namespace, settings: Settings) -> int:
    from issuance.workers.sweeper import sweep

    result = sweep(settings, now=args.now, grace=_grace(args, settings), limit=args.limit)
    p = result.promise
    print(
        f"overdue for credit: {result.found}, re-sent: {result.requeued}; uncredited: {p.uncredited},"
        f" oldest {p.oldest_age_seconds:.0f}s, overdue {p.overdue}, at risk 1h {p.at_risk_1h},"
        f" 6h {p.at_risk_6h}; accepted, not recorded: {result.unrecorded} envelopes,"
        f" re-published: {result.redriven}"
    )
    return 0


def cmd_sweeper(args: argparse.Namespace, settings: Settings) -> int:
    from issuance.workers.sweeper import run_sweeper

    run_sweeper(settings, interval=args.interval, grace=_grace(args, settings))
    return 0


def cmd_exporter(args: argparse.Namespace, settings: Settings) -> int:
    from issuance.workers.exporter import run_exporter

    run_exporter(
        settings,
        port=args.port,
        interval=args.interval,
        campaign_interval=args.campaign_interval,
        now=args.now,
    )
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from issuance.workers.demo import run_demo

    return run_demo(claims=args.claims, embedded=args.embedded)


def _register_dead_letters(sub: Subparsers) -> None:
    """``dead-letters [list|drain|replay]``: one subcommand per action, so that a
    new action is one more ``add_parser``. ``--limit`` is accepted before or
    after ``list``."""
    dead = sub.add_parser("dead-letters", help="messages that could not be used, with reasons")
    dead.add_argument("--limit", type=int, default=50, help="rows to list, newest first (default 50)")
    dead.set_defaults(func=cmd_dead_letters_list)
    actions = dead.add_subparsers(dest="sub")
    listing = actions.add_parser("list", help="the newest dead letters (the default)")
    listing.add_argument("--limit", type=int, default=argparse.SUPPRESS, help="rows to list (default 50)")
    listing.set_defaults(func=cmd_dead_letters_list)
    drain = actions.add_parser("drain", help="move what RabbitMQ dead-lettered (<queue>.XQ) into the store")
    drain.set_defaults(func=cmd_dead_letters_drain)
    replay = actions.add_parser("replay", help="re-publish chosen dead letters after a fix, once")
    replay.add_argument("--id", type=int, action="append", help="this dead letter (repeatable)")
    replay.add_argument("--reason", help="dead letters with this reason")
    replay.add_argument("--queue", help="dead letters from this queue")
    replay.add_argument("--since", type=instant, help="stored at or after this RFC 3339 instant")
    replay.add_argument("--until", type=instant, help="stored before this RFC 3339 instant")
    replay.set_defaults(func=cmd_dead_letters_replay)


def delivery_window(value: str) -> int:
    """A prefetch count RabbitMQ takes (an argparse ``type``): AMQP carries it
    in 16 bits, and a larger one would fail every consumer at its start."""
    number = positive(value)
    if number > 65_535:
        raise argparse.ArgumentTypeError(
            f"must be at most 65535 (AMQP's largest prefetch count), got {number}"
        )
    return number


def register(sub: Subparsers) -> None:
    """Add the workers' commands to the ``issuance`` subparsers."""
    worker = sub.add_parser("worker", help="run the Dramatiq workers")
    worker.add_argument("--processes", type=int, default=2, help="worker processes (default 2)")
    worker.add_argument(
        "--threads",
        type=int,
        default=16,
        help="threads per process (default 16; a claim message's thread waits for its group commit,"
        " so the threads bound how many claims are decided together)",
    )
    worker.add_argument(
        "--prefetch",
        type=delivery_window,
        help="unacknowledged messages each process holds per queue (default: twice the threads); a claim"
        " message stays unacknowledged until its claims commit, so this bounds the claims in flight",
    )
    worker.add_argument(
        "--queues", nargs="*", metavar="QUEUE", help="consume only these queues (default: every queue)"
    )
    worker.add_argument(
        "--metrics-port",
        type=int,
        help="port of this group's /metrics (default ISSUANCE_METRICS_PORT, 9191); 0: a free port,"
        " announced in ISSUANCE_METRICS_TARGETS_DIR/<group>.json",
    )
    worker.set_defaults(func=cmd_worker, quiet=True)

    _register_dead_letters(sub)

    for name, text, func in (
        (
            "sweep",
            "re-send the credit of claims bound but not credited after a grace period (one pass)",
            cmd_sweep,
        ),
        ("sweeper", "sweep every --interval seconds, with a summary line every few minutes", cmd_sweeper),
    ):
        sweeper = sub.add_parser(name, help=text)
        sweeper.add_argument(
            "--grace",
            type=float,
            help="seconds after binding (default: half ISSUANCE_RECONCILE_GRACE_SECONDS)",
        )
        sweeper.add_argument("--limit", type=int, default=5000, help="claims per pass (default 5000)")
        if name == "sweeper":
            sweeper.add_argument(
                "--interval", type=float, default=30, help="seconds between passes (default 30)"
            )
            sweeper.set_defaults(quiet=True)
        sweeper.add_argument(
            "--now", type=instant, help="evaluate at this RFC 3339 instant instead of the clock"
        )
        sweeper.set_defaults(func=func)

    exporter = sub.add_parser("exporter", help="serve campaign and promise gauges read from PostgreSQL")
    exporter.add_argument("--port", type=int, default=9192, help="HTTP port of /metrics (default 9192)")
    exporter.add_argument("--interval", type=float, default=30, help="seconds between readings")
    exporter.add_argument(
        "--campaign-interval",
        type=float,
        help="seconds between campaign readings (default: max(2 x interval, 60))",
    )
    exporter.add_argument(
        "--now", type=instant, help="evaluate the promise as if the clock read this RFC 3339 instant"
    )
    exporter.set_defaults(func=cmd_exporter, quiet=True)

    demo = sub.add_parser("demo", help="run the pipeline end to end and print a summary")
    demo.add_argument("--claims", type=int, default=3000, help="claims to publish (default 3000)")
    demo.add_argument(
        "--embedded",
        choices=["auto", "yes", "no"],
        default="auto",
        help="embedded PostgreSQL/Redis and the in-process broker (auto: unless service URLs are set)",
    )
    demo.set_defaults(func=cmd_demo, quiet=True)
