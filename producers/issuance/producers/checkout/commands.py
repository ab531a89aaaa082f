"""``issuance checkout serve`` and ``issuance checkout sweep``.

Registered by its own ``issuance.commands`` entry point (``checkout``), so
the producers' other commands module stays untouched.
"""

from __future__ import annotations

import argparse
from datetime import timedelta

from issuance.shared.cli import Subparsers
from issuance.shared.errors import OperatorError
from issuance.shared.settings import Settings, checkout_clients

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Serve the checkout API under uvicorn."""
    import uvicorn
    from issuance.producers.checkout.app import create_app

    if not checkout_clients(settings):
        if not args.no_auth:
            raise OperatorError(
                "ISSUANCE_CHECKOUT_TOKENS is empty: give the order system and each partner a "
                "name:token, or pass --no-auth to serve a trusted loopback address only"
            )
        if args.host not in LOOPBACK:
            raise OperatorError(f"--no-auth serves a loopback address only, not {args.host}")
    app = create_app(settings, hold=timedelta(minutes=args.hold_minutes))
    uvicorn.run(app, host=args.host, port=args.port, access_log=not args.no_access_log)
    return 0


def cmd_sweep(args: argparse.Namespace, settings: Settings) -> int:
    """Release the reservations whose hold lapsed unpaid."""
    from issuance.producers.checkout.service import release_timed_out
    from issuance.shared.db import database
    from issuance.shared.wire.messages import utcnow

    pool = database.pool(settings, max_size=1)
    try:
        released = release_timed_out(pool, now=utcnow())
    finally:
        pool.close()
    print(f"released {released} lapsed reservations")
    return 0


def register(sub: Subparsers) -> None:
    """Add ``checkout`` and its subcommands to the ``issuance`` subparsers."""
    checkout = sub.add_parser("checkout", help="the coupon API for the order system")
    commands = checkout.add_subparsers(dest="checkout_command", required=True)
    serve = commands.add_parser("serve", help="serve the checkout API (HTTP, OpenAPI at /api/openapi.json)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8010, help="port to listen on (default 8010)")
    serve.add_argument(
        "--hold-minutes", type=float, default=30.0, help="how long a reservation waits for payment (30)"
    )
    serve.add_argument("--no-access-log", action="store_true", help="do not log every request")
    serve.add_argument(
        "--no-auth",
        action="store_true",
        help="serve without ISSUANCE_CHECKOUT_TOKENS (a loopback address only: tests, a laptop)",
    )
    serve.set_defaults(func=cmd_serve)
    sweep = commands.add_parser("sweep", help="release reservations whose hold lapsed unpaid")
    sweep.set_defaults(func=cmd_sweep)
