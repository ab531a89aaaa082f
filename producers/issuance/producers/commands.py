"""The producers' ``issuance`` subcommands: publish, web and outbox-relay.

The ``issuance.commands`` entry point ``producers`` names :func:`register`;
``issuance.shared.cli`` finds it there, so the shared layer never imports
this package.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from issuance.shared.cli import Subparsers
from issuance.shared.settings import Settings
from issuance.shared.wire.messages import PUBLIC_TYPES


def _lines(path: str) -> Iterator[bytes]:
    with open(path, "rb") if path != "-" else sys.stdin.buffer as handle:
        for line in handle:
            if line.strip():
                yield line


def cmd_publish(args: argparse.Namespace, settings: Settings) -> int:
    """Replay or backfill a JSON-lines file, one payload per line."""
    from issuance.shared.errors import InvalidMessage
    from issuance.shared.wire.cells import publisher_for
    from issuance.shared.wire.codec import parse_line
    from rich.progress import Progress

    good, bad = [], 0
    for number, line in enumerate(_lines(args.file), start=1):
        try:
            good.append(parse_line(args.type, line))
        except InvalidMessage as exc:
            bad += 1
            print(f"line {number}: refused, {exc}", file=sys.stderr)
    with (
        publisher_for(settings) as publisher,
        Progress(disable=not sys.stderr.isatty()) as bar,
    ):
        task = bar.add_task(f"publishing {args.type}", total=len(good))
        for start in range(0, len(good), 1000):
            bar.advance(task, publisher.publish_many(good[start : start + 1000]))
    print(f"published {len(good)} {args.type} messages; refused {bad} lines")
    return 1 if bad else 0


def cmd_web(args: argparse.Namespace, settings: Settings) -> int:
    """Serve the activity page under uvicorn, logging as every process does
    (issuance.shared.logs): uvicorn applies the same configuration in each
    of its worker processes, one access line per request unless
    --no-access-log."""
    import logging

    import setproctitle
    import uvicorn
    from issuance.shared import logs

    setproctitle.setproctitle(f"issuance web :{args.port}")
    access = {} if args.no_access_log else {"uvicorn.access": "INFO"}
    logging.getLogger(__name__).info(
        "serving the activity page on http://%s:%d (uvicorn workers: %d)", args.host, args.port, args.workers
    )
    uvicorn.run(
        "issuance.producers.web:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        # Named, not "auto": without them the page would quietly fall back to
        # asyncio's loop and h11, at a fraction of the requests per core.
        # httptools, with each response sent in one write (web/server.py).
        loop="uvloop",
        http="issuance.producers.web.server:PageHttpProtocol",
        access_log=not args.no_access_log,
        log_config=logs.dict_config(settings, verbose=args.verbose, loggers=access),
        proxy_headers=True,
        forwarded_allow_ips=args.forwarded_allow_ips,
    )
    return 0


def cmd_outbox_relay(args: argparse.Namespace, settings: Settings) -> int:
    """Publish the pending rows of an order system's outbox table, with a
    line when it starts and a summary line when it stops (SIGTERM, Ctrl-C)."""
    import signal
    import threading
    import time

    from issuance.producers.outbox import relay_forever

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(f"outbox relay: publishing {args.table} in batches of {args.batch}; Ctrl-C stops", flush=True)
    started = time.monotonic()
    published = relay_forever(
        args.dsn or settings.database_url, settings, batch=args.batch, table=args.table, stop=stop
    )
    print(f"outbox relay: published {published} rows in {time.monotonic() - started:.1f}s", flush=True)
    return 0


def register(sub: Subparsers) -> None:
    """Add the producers' commands to the ``issuance`` subparsers."""
    publish = sub.add_parser("publish", help="publish a JSON-lines file of payloads")
    publish.add_argument("type", choices=PUBLIC_TYPES, help="the message type of every line")
    publish.add_argument("--file", required=True, help="path, or - for standard input")
    publish.set_defaults(func=cmd_publish)

    web = sub.add_parser("web", help="serve the activity page (claims and their status)")
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    web.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    web.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    web.add_argument("--no-access-log", action="store_true", help="do not log every request")
    web.add_argument(
        "--forwarded-allow-ips", default="127.0.0.1", help="proxies whose X-Forwarded-For is trusted"
    )
    web.set_defaults(func=cmd_web, quiet=True)

    relay = sub.add_parser("outbox-relay", help="publish an order system's transactional outbox")
    relay.add_argument("--dsn", help="the order system's database (default: ISSUANCE_DATABASE_URL)")
    relay.add_argument(
        "--table", default="issuance_outbox", help="the outbox table (default issuance_outbox)"
    )
    relay.add_argument("--batch", type=int, default=500, help="rows per transaction (default 500)")
    relay.set_defaults(func=cmd_outbox_relay, quiet=True)
