"""The back office's ``issuance`` subcommands: channels, activities, code
batches, coupons and campaign reports. ``issuance.shared.cli`` calls :func:`register`.

Errors an operator can fix (BackOfficeError, an OperatorError) are printed
on one line by ``issuance.shared.cli.main`` with exit status 2; nothing is
changed when one is raised.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, BinaryIO

from issuance.shared.errors import BadInput
from issuance.shared.settings import Settings


def _session(settings: Settings) -> Any:
    from issuance.shared.db import database
    from sqlalchemy.orm import Session

    return Session(database.engine(settings))


def _connect(settings: Settings) -> Any:
    import psycopg

    return psycopg.connect(settings.database_url)


def cmd_channel_create(args: argparse.Namespace, settings: Settings) -> int:
    from issuance.shared.backoffice import catalog

    with _session(settings) as session, session.begin():
        channel = catalog.create_channel(session, args.name)
        print(f"channel {channel.name} ({channel.channel_id})")
    return 0


def cmd_activity_create(args: argparse.Namespace, settings: Settings) -> int:
    from issuance.shared.backoffice import catalog

    spec = catalog.load_activity_file(args.file)
    with _session(settings) as session, session.begin():
        activity = catalog.create_activity(session, spec)
        print(f"activity {activity.slug} ({activity.activity_id}) with budget {activity.budget}")
    return 0


def cmd_activity_apply(args: argparse.Namespace, settings: Settings) -> int:
    from issuance.shared.backoffice import catalog

    spec = catalog.load_activity_file(args.file)
    with _session(settings) as session, session.begin():
        activity, changed = catalog.apply_activity(session, spec)
        print(f"activity {activity.slug}: {', '.join(changed) or 'unchanged'}")
    return 0


def _value(name: str, text: str) -> Any:
    """A command-line value as YAML reads it: numbers, true/false, null,
    timestamps; anything else, and any value but null of a text field
    (``--set title=2026``), stays a string."""
    import yaml
    from issuance.shared.backoffice import catalog

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if name in catalog.TEXT_FIELDS and value is not None else value


def cmd_activity_edit(args: argparse.Namespace, settings: Settings) -> int:
    from issuance.shared.backoffice import catalog

    changes: dict[str, Any] = {}
    for item in args.set or []:
        name, sep, raw = item.partition("=")
        if not sep:
            raise catalog.BackOfficeError(f"--set takes FIELD=VALUE, got {item!r}")
        value = _value(name.strip(), raw)
        changes[name.strip()] = value.isoformat() if isinstance(value, datetime) else value
    if args.templates:
        try:
            changes["templates"] = json.loads(args.templates)
        except json.JSONDecodeError as exc:
            raise BadInput(f"--templates is not a JSON list: {exc}") from None
    with _session(settings) as session, session.begin():
        changed = catalog.update_activity(session, args.slug, changes)
        print(f"activity {args.slug}: {', '.join(changed) or 'unchanged'}")
    return 0


def cmd_activity_show(args: argparse.Namespace, settings: Settings) -> int:
    from issuance.shared.backoffice import catalog

    with _session(settings) as session:
        print(catalog.show_activity(session, args.slug), end="")
    return 0


def cmd_activity_list(args: argparse.Namespace, settings: Settings) -> int:
    import dataclasses

    from issuance.shared.backoffice import catalog
    from rich.console import Console
    from rich.table import Table

    with _session(settings) as session:
        rows = catalog.list_activities(session, page=args.page, base_url=settings.activity_base_url)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
        return 0
    table = Table(title=f"activities, page {args.page} (newest first, {catalog.PAGE_SIZE} per page)")
    for column in ("slug", "title", "channel", "prefixes", "validity", "window", "online", "budget", "url"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r.slug,
            r.title,
            r.channel,
            ",".join(r.prefixes),
            r.validity,
            r.window,
            "on" if r.online else "off",
            str(r.budget),
            r.url,
        )
    Console(width=200).print(table)
    return 0


def cmd_codes_generate(args: argparse.Namespace, settings: Settings) -> int:
    from issuance.shared.backoffice import catalog
    from rich.progress import Progress

    with Progress(disable=args.count < 200_000 or not sys.stderr.isatty()) as progress:
        task = progress.add_task(f"codes {args.template}", total=args.count)
        with _session(settings) as session, session.begin():
            batch = catalog.generate_codes(
                session,
                args.template,
                args.count,
                bits=args.bits,
                progress=lambda n: progress.advance(task, n),
            )
            print(f"batch {batch.batch_id}: {batch.size} codes for {args.template}")
    return 0


def open_export(path: str, *, force: bool) -> BinaryIO:
    """A new file only its owner can read (codes are as good as money),
    never through a symlink; an existing file only with ``force``."""
    import os

    from issuance.shared.backoffice import catalog

    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise catalog.BackOfficeError(
            f"{path} exists: choose a new file, or pass --force to replace it"
        ) from None
    except OSError as exc:
        if os.path.islink(path):
            raise catalog.BackOfficeError(
                f"{path} is a symbolic link: codes are never written through one"
            ) from None
        raise catalog.BackOfficeError(f"cannot write {path}: {exc.strerror}") from None
    os.fchmod(fd, 0o600)  # a replaced file keeps its old mode otherwise
    return os.fdopen(fd, "wb")


def _export(args: argparse.Namespace, settings: Settings, chunks: Callable[[Any], Iterable[bytes]]) -> int:
    """Write what ``chunks(conn)`` yields to ``args.out`` (``-``: standard
    output), through ``open_export``'s safe file."""
    out = sys.stdout.buffer if args.out == "-" else open_export(args.out, force=args.force)
    try:
        with _connect(settings) as conn:
            for data in chunks(conn):
                out.write(data)
    finally:
        if out is not sys.stdout.buffer:
            out.close()
        else:
            out.flush()
    return 0


def cmd_codes_export(args: argparse.Namespace, settings: Settings) -> int:
    from issuance.shared.backoffice import catalog

    return _export(args, settings, lambda conn: catalog.export_batch(conn, args.batch))


def cmd_codes_usage(args: argparse.Namespace, settings: Settings) -> int:
    from issuance.shared.backoffice import code_usage

    return _export(args, settings, lambda conn: code_usage.export_usage(conn, args.activity))


def cmd_coupons_expire(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from issuance.shared.backoffice import catalog
    from issuance.shared.wire.messages import utcnow

    while True:
        with _connect(settings) as conn:
            expired = catalog.expire_coupons(conn, utcnow())
        print(f"expired {expired} coupons", flush=True)
        if not args.every:
            return 0
        time.sleep(args.every)


def cmd_coupons_cancel(args: argparse.Namespace, settings: Settings) -> int:
    from issuance.shared.backoffice import catalog
    from issuance.shared.wire.messages import utcnow

    with _connect(settings) as conn:
        changed = catalog.cancel_coupon(conn, args.code, utcnow())
    print(f"{args.code}: {'cancelled' if changed else 'already cancelled'}")
    return 0


def cmd_coupons_write_off(args: argparse.Namespace, settings: Settings) -> int:
    from issuance.shared.backoffice import promos
    from issuance.shared.wire.messages import utcnow

    with _connect(settings) as conn:
        answer = promos.write_off(conn, args.code, by=args.by, reason=args.reason, at=utcnow())
    record = answer.record
    assert record is not None
    first = f" (already, by {record.written_off_by} at {record.written_off_at.isoformat()})"
    print(f"{args.code}: written off{first if answer.repeated else ''}")
    return 0


def cmd_promo_create(args: argparse.Namespace, settings: Settings) -> int:
    from issuance.shared.backoffice import promos
    from issuance.shared.db.promo_store import PromoSpec

    spec = PromoSpec(
        code=args.code,
        template=args.template,
        max_uses=args.max_uses,
        per_member_limit=args.per_member,
        valid_from=args.valid_from,
        valid_until=args.valid_until,
    )
    with _connect(settings) as conn:
        promos.create_promo(conn, spec)
    print(f"promo code {args.code}: {args.max_uses} uses on template {args.template}")
    return 0


def _instant(text: str) -> Any:
    from datetime import datetime

    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from issuance.shared.backoffice import reports
    from issuance.shared.cellmap import configured

    if configured(settings):
        from issuance.shared.backoffice.cells import report_all

        return report_all(args, settings)
    if args.by_cell:
        raise BadInput("--by-cell needs a cell map (ISSUANCE_CELLS)")
    with _connect(settings) as conn:
        if args.channel:
            report = reports.channel_report(conn, args.channel)
        else:
            report = reports.activity_report(conn, args.activity)
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print(reports.render_table(report))
    return 0


def _group(sub: Any, name: str, help_: str) -> Any:
    """A command with subcommands (``issuance activity ...``)."""
    return sub.add_parser(name, help=help_).add_subparsers(dest="sub", required=True)


def _command(group: Any, func: Any, name: str, **options: Any) -> Any:
    """A subcommand of ``group`` that runs ``func``."""
    parser = group.add_parser(name, **options)
    parser.set_defaults(func=func)
    return parser


def register(sub: Any) -> None:
    """Add the back-office commands to the ``issuance`` subparsers."""
    channel = _group(sub, "channel", "distribution channels")
    create = _command(channel, cmd_channel_create, "create", help="create a channel (names are unique)")
    create.add_argument("name", help="the channel's name")

    activity = _group(sub, "activity", "activities (campaigns)")
    create = _command(
        activity, cmd_activity_create, "create", help="create an activity from a JSON or YAML file"
    )
    create.add_argument("--file", required=True, help="the activity file (.json, .yaml or .yml)")
    apply = _command(
        activity, cmd_activity_apply, "apply", help="create the activity of a file, or bring it to the file"
    )
    apply.add_argument("--file", required=True, help="the activity file (.json, .yaml or .yml)")
    edit = _command(
        activity,
        cmd_activity_edit,
        "edit",
        help="change fields of an activity; what is unsafe once packages are issued is refused",
    )
    edit.add_argument("slug", help="the activity's slug")
    edit.add_argument("--set", action="append", metavar="FIELD=VALUE", help="e.g. --set budget=5000")
    edit.add_argument("--templates", help="the templates as a JSON list (only before any claim)")
    show = _command(
        activity,
        cmd_activity_show,
        "show",
        help="print an activity in its file form (YAML, times in its zone); apply takes it back unchanged",
    )
    show.add_argument("slug", help="the activity's slug")
    listing = _command(activity, cmd_activity_list, "list", help="15 per page, newest first")
    listing.add_argument("--page", type=int, default=1, help="page number, from 1 (default 1)")
    listing.add_argument("--json", action="store_true", help="print the page as JSON")

    codes = _group(sub, "codes", "code batches")
    generate = _command(
        codes, cmd_codes_generate, "generate", help="generate a numbered batch of codes for a template"
    )
    generate.add_argument("--template", required=True, help="the template's prefix")
    generate.add_argument("--count", type=int, required=True, help="how many codes")
    generate.add_argument("--bits", type=int, default=64, help="random bits per code (default 64)")
    export = _command(codes, cmd_codes_export, "export", help="stream a batch as CSV (any number of times)")
    export.add_argument(
        "--batch", type=int, required=True, help="the batch number (codes generate prints it)"
    )
    export.add_argument("--out", default="-", help="new file (mode 0600), or - for standard output")
    export.add_argument("--force", action="store_true", help="replace --out if it exists (never a symlink)")

    usage = _command(
        codes,
        cmd_codes_usage,
        "usage",
        help="per code: member, claim time, channel, use time, order, discount (CSV)",
    )
    usage.add_argument("--activity", required=True, help="the activity's slug")
    usage.add_argument("--out", default="-", help="new file (mode 0600), or - for standard output")
    usage.add_argument("--force", action="store_true", help="replace --out if it exists (never a symlink)")

    coupons = _group(sub, "coupons", "coupons after issuance")
    expire = _command(
        coupons,
        cmd_coupons_expire,
        "expire",
        help="the periodic sweep: mark unused coupons past expiry expired",
    )
    expire.add_argument("--every", type=float, help="run forever, sweeping every this many seconds")
    cancel = _command(coupons, cmd_coupons_cancel, "cancel", help="cancel a coupon (unused or never issued)")
    cancel.add_argument("code", help="the coupon code")
    write_off = _command(
        coupons,
        cmd_coupons_write_off,
        "write-off",
        help="redeem a gift coupon or a partner's or printed code without an order (audited)",
    )
    write_off.add_argument("code", help="the code")
    write_off.add_argument("--by", required=True, help="who writes it off (kept in the audit record)")
    write_off.add_argument("--reason", required=True, help="why (kept in the audit record)")
    promo = _command(coupons, cmd_promo_create, "promo", help="create a shared promo code with a usage cap")
    promo.add_argument("code", help="the promo code (1 to 16 letters or digits), e.g. SPRING50")
    promo.add_argument("--template", required=True, help="the template's prefix: kind, value and rules")
    promo.add_argument("--max-uses", type=int, required=True, help="uses in all, over every member")
    promo.add_argument("--per-member", type=int, help="uses per member (default: no limit)")
    promo.add_argument("--valid-from", type=_instant, help="ISO 8601 time with zone")
    promo.add_argument("--valid-until", type=_instant, help="ISO 8601 time with zone")

    report = sub.add_parser("report", help="a campaign's report: packages, usage, cost, funnel, rebates")
    which = report.add_mutually_exclusive_group(required=True)
    which.add_argument("--activity", help="the activity's slug")
    which.add_argument("--channel", help="a channel's name: every activity on it")
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.add_argument(
        "--by-cell", action="store_true", help="with a cell map: each cell's figures under the sum"
    )
    report.set_defaults(func=cmd_report)
