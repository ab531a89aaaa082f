"""``issuance office``: create back-office users and serve the back office.
``issuance.shared.cli`` calls :func:`register`."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from issuance.shared.settings import Settings


def _password(args: argparse.Namespace) -> str:
    """From a prompt (typed twice) on a terminal, else the first line of stdin."""
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            from issuance.shared.errors import BadInput

            raise BadInput("the two passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def cmd_user_add(args: argparse.Namespace, settings: Settings) -> int:
    from issuance.shared.backoffice.web import auth
    from issuance.shared.db import database
    from sqlalchemy.orm import Session

    password = _password(args)
    engine = database.engine(settings)
    try:
        with Session(engine) as session, session.begin():
            user = auth.create_user(session, args.name, args.role, password, by=getpass.getuser())
            print(f"user {user.name} ({user.role})")
    finally:
        engine.dispose()
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """One process: code generation jobs live in its memory."""
    import uvicorn
    from issuance.shared.backoffice.web.app import create_app
    from issuance.shared.backoffice.web.approvals import DEFAULT_THRESHOLD

    threshold = DEFAULT_THRESHOLD if args.approval_threshold is None else args.approval_threshold
    app = create_app(settings, approval_threshold=threshold, https_only=args.https_only)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        access_log=False,
        proxy_headers=True,
        forwarded_allow_ips=args.forwarded_allow_ips,
    )
    return 0


def register(sub: Any) -> None:
    """Add ``issuance office ...`` to the ``issuance`` subparsers."""
    office = sub.add_parser("office", help="the back office on the web: users, serve").add_subparsers(
        dest="sub", required=True
    )
    add = office.add_parser("user-add", help="create a back-office user (password from a prompt or stdin)")
    add.add_argument("name", help="the name to sign in with (lowercase letters, digits, . _ -)")
    add.add_argument(
        "--role",
        required=True,
        choices=["viewer", "operator", "approver"],
        help="viewer reads; operator changes; approver signs off budgets",
    )
    add.set_defaults(func=cmd_user_add)
    serve = office.add_parser("serve", help="serve the back office under uvicorn")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8100, help="port to listen on (default 8100)")
    serve.add_argument(
        "--approval-threshold",
        type=int,
        help="budgets above this many packages wait for an approver (default: 10000)",
    )
    serve.add_argument("--https-only", action="store_true", help="send the session cookie over TLS only")
    serve.add_argument(
        "--forwarded-allow-ips", default="127.0.0.1", help="proxies whose X-Forwarded-For is trusted"
    )
    serve.set_defaults(func=cmd_serve)
