"""The issuance command: schema, back office, publishing, workers,
verification and the embedded demo. Run `issuance COMMAND --help` for the
options of one command."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import urlsplit

from issuance.shared.errors import (
    BadInput,
    ConfigurationError,
    OperatorError,
    PublishError,
    ServiceUnavailable,
    TransientError,
)
from issuance.shared.settings import PREFIX, Settings, SettingsError, require_phone_keys, settings_from

if TYPE_CHECKING:
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    Subparsers: TypeAlias = argparse._SubParsersAction

Command: TypeAlias = Callable[[argparse.Namespace, Settings], int]

# The group of the entry points through which the workers and the producers
# add their commands (pyproject.toml); the shared layer never imports them.
COMMANDS_GROUP = "issuance.commands"

log = logging.getLogger("issuance")


def instant(value: str) -> datetime:
    """An RFC 3339 instant from the command line (the what-if clock); an
    argparse ``type``, so a malformed one is a usage error."""
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    from issuance.shared.db import database

    database.upgrade(settings, args.revision)
    print(f"database at {args.revision}")
    return 0


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    if args.cells or settings.cells:
        from issuance.shared.backoffice.cells import verify_all

        return verify_all(args, settings)

    import psycopg
    from issuance.shared.db.verify import verify, with_ledger

    grace = timedelta(seconds=settings.reconcile_grace_seconds)
    with psycopg.connect(settings.database_url) as conn:
        report = verify(conn, grace=grace)
        ledger = _reconcile_ledger(conn, settings, grace)
    report = with_ledger(report, ledger.rows())
    if args.json:
        print(json.dumps({**report.as_json(), "ledger": ledger.as_json()}, indent=2))
    else:
        print("counts: " + ", ".join(f"{k}={v}" for k, v in report.counts.items()))
        print("refused: " + (", ".join(f"{k}={v}" for k, v in report.refusals.items()) or "none"))
        print(ledger.summary())
        for name, rows in report.breaches.items():
            if rows:
                print(f"BREACH {name}: {len(rows)} e.g. {rows[:3]}")
        print("verify: clean" if report.clean else "verify: BREACHES FOUND")
    return 0 if report.clean else 1


def _reconcile_ledger(conn: Any, settings: Settings, grace: timedelta) -> Any:
    """The acceptance ledger against the database; absent where there is
    none (the embedded demo). RabbitMQ down is a ServiceUnavailable, as for
    every command: without the ledger verify cannot vouch for accepted claims."""
    from issuance.shared.db.ledger import Reconciliation, reconcile
    from issuance.shared.wire.ledger import LedgerAbsent

    try:
        # A hundred examples, as for the other checks; the summary counts them all.
        return reconcile(conn, settings.amqp_url, grace=grace, keep=100)
    except LedgerAbsent as exc:
        return Reconciliation(absent=str(exc))


def cmd_schemas(args: argparse.Namespace, settings: Settings) -> int:
    from issuance.shared.wire.messages import MESSAGE_TYPES

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, message_type in MESSAGE_TYPES.items():
        path = out / f"{name}.v{message_type.VERSION}.json"
        path.write_text(json.dumps(message_type.json_schema(), indent=2) + "\n")
        print(path)
    return 0


def cmd_chart(args: argparse.Namespace, settings: Settings) -> int:
    import psycopg
    from issuance.shared.backoffice.charts import load_series, render

    with psycopg.connect(settings.database_url) as conn:
        series = load_series(conn, activity=args.activity, since=args.since, until=args.until)
    if not series.times:
        print("no granted claims match", file=sys.stderr)
        return 1
    path = render(series, args.out, promise_seconds=settings.credit_promise_seconds)
    print(f"chart of {series.claimed[-1]} claims written to {path}")
    return 0


def positive(value: str) -> int:
    """A whole number of at least 1 (an argparse ``type``)."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def cmd_phone_keys_status(args: argparse.Namespace, settings: Settings) -> int:
    import psycopg
    from issuance.shared.db import rekey

    require_phone_keys(settings)  # a bad key set is named before anything is opened
    with psycopg.connect(settings.database_url) as conn:
        counts = rekey.members_per_key(conn, settings)
    for count in counts:
        print(f"key {count.key_id}: {count.members} members ({count.role})")
    stranded = [c for c in counts if c.role == "not configured" and c.members]
    if stranded:
        print("members under a key that is not configured are new members when they claim again")
    return 1 if stranded else 0


def cmd_phone_keys_rekey(args: argparse.Namespace, settings: Settings) -> int:
    import psycopg
    import redis
    from issuance.shared.db import rekey

    require_phone_keys(settings)
    with contextlib.ExitStack() as stack:
        lines = sys.stdin if args.numbers == "-" else stack.enter_context(open(args.numbers))
        conn = stack.enter_context(psycopg.connect(settings.database_url))
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
        stack.callback(client.close)
        report = rekey.rekey(conn, client, settings, lines, from_id=args.key_id, batch_size=args.batch_size)
        counts = rekey.members_per_key(conn, settings)
    print(
        f"re-keyed {report.rekeyed} members of {report.numbers} numbers in {report.batches} batches"
        f" ({report.invalid} not valid numbers)"
    )
    for count in counts:
        print(f"key {count.key_id}: {count.members} members ({count.role})")
    return 0


def _register_phone_keys(sub: Subparsers) -> None:
    keys = sub.add_parser("phone-keys", help="phone key rotation: members per key, re-keying")
    commands = keys.add_subparsers(dest="phone_keys_command", required=True)
    status = commands.add_parser("status", help="members stored under each phone key ID")
    status.set_defaults(func=cmd_phone_keys_status)
    move = commands.add_parser(
        "rekey", help="move the members of a list of numbers from the older phone keys to the current one"
    )
    move.add_argument("numbers", help="a file of numbers, one a line (the shop's member export); - for stdin")
    move.add_argument(
        "--from", dest="key_id", help="only members under this key ID (default: every older one)"
    )
    move.add_argument(
        "--batch-size", type=positive, default=1000, help="numbers per transaction (default: 1000)"
    )
    move.set_defaults(func=cmd_phone_keys_rekey)


def register(sub: Subparsers) -> None:
    """The shared layer's commands: schema, back office, verify, schemas, chart."""
    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    up = db.add_parser("upgrade", help="apply the Alembic migrations")
    up.add_argument("revision", nargs="?", default="heads", help="target revision (default: heads)")
    up.set_defaults(func=cmd_db_upgrade)

    from issuance.shared.backoffice import commands

    commands.register(sub)
    from issuance.shared.backoffice.web import commands as office_commands

    office_commands.register(sub)
    from issuance.shared.backoffice import cells as cell_commands

    cell_commands.register(sub, build_parser=build_parser, redact=redact)
    # The back office's server runs until stopped and user-add waits for a
    # password: neither gets a progress note.
    office = sub.choices["office"]
    for action in office._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                child.set_defaults(quiet=True)

    verify = sub.add_parser("verify", help="check every invariant; non-zero exit on a breach")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.add_argument(
        "--cells", action="store_true", help="every cell and the whole (ISSUANCE_CELLS set: always)"
    )
    cell_commands.add_budget_option(verify)
    verify.set_defaults(func=cmd_verify)

    schemas = sub.add_parser("schemas", help="write the JSON Schema of every message")
    schemas.add_argument(
        "--out", default="shared/issuance/shared/wire/schemas", help="directory to write the schemas to"
    )
    schemas.set_defaults(func=cmd_schemas)

    chart = sub.add_parser("chart", help="PNG chart: claims, credits, backlog and latency percentiles")
    chart.add_argument("--activity", help="the activity's slug (default: every activity)")
    chart.add_argument("--since", type=instant, help="RFC 3339 start of the window (a benchmark run)")
    chart.add_argument("--until", type=instant, help="RFC 3339 end of the window")
    chart.add_argument("--out", required=True, help="the PNG file to write")
    chart.set_defaults(func=cmd_chart)

    _register_phone_keys(sub)


def build_parser() -> argparse.ArgumentParser:
    """The shared commands, then those each installed side registers under
    the ``issuance.commands`` entry points (sorted by name)."""
    parser = argparse.ArgumentParser(prog="issuance", description=__doc__)
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log everything at DEBUG, the libraries' loggers too (like ISSUANCE_LOG_LEVEL=DEBUG)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    plugins = sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name)
    if not plugins:
        print(
            f"issuance: no {COMMANDS_GROUP} entry points, so no worker or producer commands;"
            " reinstall the package (make install)",
            file=sys.stderr,
        )
    for entry in plugins:
        entry.load()(sub)
    return parser


# Operator errors ------------------------------------------------------------

_URL_SCHEMES = {
    "database_url": ("postgresql", "postgres"),
    "amqp_url": ("amqp", "amqps"),
    "redis_url": ("redis", "rediss", "unix"),
}


def redact(url: str) -> str:
    """``url`` with its password, in the user part or a ``password=``
    parameter, replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is not None:
        credentials, _, host = parts.netloc.rpartition("@")
        url = url.replace(parts.netloc, f"{credentials.partition(':')[0]}:***@{host}", 1)
    return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", url)


def check_urls(settings: Settings) -> None:
    """Refuse a service URL that is not one: the wrong scheme, no host part,
    a port that is not a number."""
    for field, schemes in _URL_SCHEMES.items():
        url = getattr(settings, field)
        name = f"{PREFIX}{field.upper()}"
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - parsing the port is the check
        except ValueError as exc:
            raise ConfigurationError(f"{name} is not a valid URL ({exc}): {redact(url)}") from None
        if parts.scheme not in schemes or not url.startswith(f"{parts.scheme}://"):
            expected = ", ".join(f"{s}://" for s in schemes)
            raise ConfigurationError(f"{name} must start with {expected}; got {redact(url)}")


def _services(settings: Settings | None) -> dict[str, str]:
    settings = settings or Settings()
    return {
        "postgres": f"PostgreSQL ({redact(settings.database_url)})",
        "rabbitmq": f"RabbitMQ ({redact(settings.amqp_url)})",
        "redis": f"Redis ({redact(settings.redis_url)})",
    }


def _detail(exc: BaseException) -> str:
    """What ``exc`` says, or what its cause says when it says nothing."""
    text = str(exc).strip().rstrip(":").strip()
    cause = exc.__cause__
    if cause is not None and (not text or str(exc).rstrip().endswith(":")):
        cause_text = str(cause).strip()
        text = f"{text}: {cause_text}" if cause_text else f"{text} ({type(cause).__name__})"
    return text or type(exc).__name__


def operator_error(exc: BaseException, settings: Settings | None = None) -> OperatorError | None:
    """``exc`` as the operator error it stands for, or None for a bug.

    Operator errors are raised as such; a file that cannot be opened, the
    configuration, and a service that is down or refuses arrive as the
    exceptions of the standard library and of the service clients, and are
    named here, where every command passes."""
    if isinstance(exc, OperatorError):
        return exc
    if isinstance(exc, SettingsError):
        return ConfigurationError(str(exc))
    from issuance.shared.wire.signing import SigningConfigError

    if isinstance(exc, SigningConfigError):
        return ConfigurationError(str(exc))
    if isinstance(exc, OSError) and exc.filename is not None:
        return BadInput(f"{exc.filename}: {exc.strerror or exc}")

    import dramatiq.errors
    import pika.exceptions
    import psycopg
    import redis.exceptions
    import sqlalchemy.exc

    services = _services(settings)
    cause = exc.orig if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.orig is not None else exc
    if isinstance(cause, psycopg.OperationalError):
        return ServiceUnavailable(f"{services['postgres']}: {_detail(cause)}")
    if isinstance(cause, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return ServiceUnavailable(f"{services['redis']}: {_detail(cause)}")
    # ConnectionFailed and ConnectionClosed carry the same names in every dramatiq 2.x.
    broker_down = (
        pika.exceptions.AMQPConnectionError,
        dramatiq.errors.ConnectionFailed,
        dramatiq.errors.ConnectionClosed,
    )
    if isinstance(cause, broker_down):
        return ServiceUnavailable(f"{services['rabbitmq']}: {_detail(cause)}")
    if isinstance(cause, PublishError):
        return ServiceUnavailable(f"{services['rabbitmq']}: {_detail(cause)}")
    if isinstance(cause, TransientError):
        return ServiceUnavailable(_detail(cause))
    return None


# A command still running after this many seconds says so, and says when it
# is done: a long `activity create` or `verify` is not mistaken for a hang.
PROGRESS_AFTER_SECONDS = 2.0


@contextlib.contextmanager
def progress_note(args: argparse.Namespace, *, terminal: bool | None = None) -> Iterator[None]:
    """On a terminal, tell that a long command is working, and when it is
    done (a failure says so in its own error line). Commands that run until
    stopped or wait for a person set ``quiet=True``; in a pipe or a log file
    (``terminal`` False) the command's own output is the record."""
    terminal = sys.stderr.isatty() if terminal is None else terminal
    if getattr(args, "quiet", False) or not terminal:
        yield
        return
    name = " ".join(
        getattr(args, key) for key in ("command", "sub", "db_command") if getattr(args, key, None)
    )
    started = time.monotonic()
    noted = threading.Event()

    def note() -> None:
        noted.set()
        print(f"{name}: working...", file=sys.stderr, flush=True)

    timer = threading.Timer(PROGRESS_AFTER_SECONDS, note)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
    if noted.is_set():
        print(f"{name}: done in {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    from issuance.shared import logs

    args = build_parser().parse_args(argv)
    logs.configure(verbose=args.verbose)
    settings: Settings | None = None
    try:
        # Read now, not from the process-wide cache: a command run in a process
        # that read the environment earlier (a test, an embedding program)
        # must see the environment it is run with.
        settings = settings_from(os.environ)
        logs.configure(settings, verbose=args.verbose)
        check_urls(settings)
        with progress_note(args):
            return int(args.func(args, settings))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        problem = operator_error(exc, settings)
        if problem is None:
            raise  # a bug: the traceback is what its fixer needs
        print("error: " + " ".join(str(problem).split()), file=sys.stderr)
        return problem.exit_status


if __name__ == "__main__":
    sys.exit(main())
