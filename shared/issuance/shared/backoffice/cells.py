"""``issuance cells``: the cell map, commands run in every cell, budgets and
code pools split over cells and moved between them, and the checks across
cells (issuance.shared.db.cells holds the SQL)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from issuance.shared.cellmap import cell_settings, configured, load_cell_map
from issuance.shared.domain.cells import (
    Cell,
    CellMapError,
    format_slots,
    handed_over,
    parse_slots,
    slot_ranges,
    split_evenly,
)
from issuance.shared.errors import BadInput, OperatorError, ServiceUnavailable
from issuance.shared.settings import Settings

if TYPE_CHECKING:
    from issuance.shared.backoffice.catalog import CatalogState
    from issuance.shared.backoffice.reports import ActivityReport


class CellCommandError(OperatorError):
    """A cell operation refused; nothing (or, for a move, only the donor's
    committed half, which the message names) was changed."""


@contextlib.contextmanager
def _conns(cells: Sequence[Cell], *, autocommit: bool = False) -> Iterator[dict[str, Any]]:
    """A connection to each cell's database; with ``autocommit``, each
    ``conn.transaction()`` block is a transaction of its own, committed at
    its end."""
    import psycopg

    opened: dict[str, Any] = {}
    try:
        for cell in cells:
            try:
                opened[cell.name] = psycopg.connect(cell.database_url, autocommit=autocommit)
            except psycopg.OperationalError as exc:
                raise ServiceUnavailable(f"cell {cell.name}: PostgreSQL cannot be reached: {exc}") from None
        yield opened
    finally:
        for conn in opened.values():
            conn.close()


def _pairs(items: Sequence[str] | None, what: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items or []:
        name, sep, raw = item.partition("=")
        try:
            out[name.strip()] = int(raw)
        except ValueError:
            raise BadInput(f"{what} takes NAME=COUNT, got {item!r}") from None
        if not sep or out[name.strip()] < 0:
            raise BadInput(f"{what} takes NAME=COUNT, got {item!r}")
    return out


def _refusing(exc: Exception) -> CellCommandError:
    return CellCommandError(str(exc))


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    redact = args.redact
    cells = load_cell_map(settings)
    if not configured(settings):
        print("no cell map (ISSUANCE_CELLS): one implicit cell")
    for cell in cells.cells:
        print(
            f"{cell.name}: number {cell.number}, ring slots {format_slots(cell.slots)} ({len(cell.slots)}),"
            f" database {redact(cell.database_url)}, broker {redact(cell.amqp_url)}"
        )
    return 0


def _per_cell_argv(args: argparse.Namespace) -> list[str]:
    if not args.argv:
        raise BadInput(f"cells {args.cells_command} needs a command, e.g. cells each -- db upgrade")
    argv: list[str] = args.argv[1:] if args.argv[0] == "--" else args.argv
    if argv and argv[0] == "cells":
        raise BadInput(f"cells {args.cells_command} runs per-cell commands, not cells commands")
    return argv


# The commands that change the catalog (channels, activities, templates):
# ``cells each`` runs them as ``cells apply`` does.
CATALOG_COMMANDS = (
    ("channel", "create"),
    ("activity", "create"),
    ("activity", "apply"),
    ("activity", "edit"),
)


def _changes_catalog(argv: Sequence[str]) -> bool:
    return tuple(argv[:2]) in CATALOG_COMMANDS


def cmd_each(args: argparse.Namespace, settings: Settings) -> int:
    """Run an ``issuance`` command once per cell, with that cell's settings;
    a change of the catalog goes through :func:`cmd_apply`."""
    argv = _per_cell_argv(args)
    if _changes_catalog(argv):
        return cmd_apply(args, settings)
    status = 0
    for cell in load_cell_map(settings).cells:
        print(f"[{cell.name}]", flush=True)
        sub = args.build_parser().parse_args(argv)
        status = max(status, int(sub.func(sub, cell_settings(settings, cell))))
    return status


def change_key(argv: Sequence[str]) -> str:
    """The name of a cross-cell change: its command line and the content of
    the files it names (an activity file edited since is another change)."""
    from pathlib import Path

    digest = hashlib.sha256()
    for arg in argv:
        digest.update(arg.encode() + b"\0")
        path = Path(arg)
        with contextlib.suppress(OSError):
            if path.is_file():
                digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def catalog_states(settings: Settings, cells: Sequence[Cell]) -> dict[str, CatalogState]:
    """Each cell's catalog version and digest."""
    from issuance.shared.backoffice import catalog
    from issuance.shared.db import database
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.orm import Session

    states: dict[str, CatalogState] = {}
    for cell in cells:
        engine = database.engine(cell_settings(settings, cell))
        try:
            with Session(engine) as session:
                states[cell.name] = catalog.catalog_state(session)
        except OperationalError as exc:
            raise ServiceUnavailable(f"cell {cell.name}: PostgreSQL cannot be reached: {exc.orig}") from None
        finally:
            engine.dispose()
    return states


def _one_catalog(states: Mapping[str, CatalogState], names: Sequence[str], done: Sequence[str]) -> None:
    """Refuse unless the cells are at one catalog version and digest, or, for
    a change that reached only some of them (``done``), unless those are all
    at one version made by it from where all the others still are."""
    pending = [n for n in names if n not in done]
    same = (
        len({(states[n].version, states[n].digest) for n in pending}) <= 1
        and len({(states[n].version, states[n].digest) for n in done}) <= 1
    )
    if same and done and pending:
        made, base = states[done[0]], states[pending[0]]
        same = made.version == base.version + 1 and made.previous_digest == base.digest
    if not same:
        shown = "; ".join(f"{n} {states[n].shown()}" for n in names)
        raise CellCommandError(
            f"the cells' catalogs differ ({shown}): a cell was changed alone; bring it back to the"
            " others' definition (issuance verify --cells shows the cells), then apply again"
        )


def cmd_apply(args: argparse.Namespace, settings: Settings) -> int:
    """Apply one change of the catalog to every cell. Refuses unless every
    cell is at the same catalog version and digest; then changes each cell
    in its own transaction, which commits only if the cell is still at that
    version (compare-and-set). A cell that fails stops the run, and the
    message names the cells that have the change and those that do not;
    running the same command again skips the cells that have it."""
    from issuance.shared.backoffice import catalog

    argv = _per_cell_argv(args)
    if not _changes_catalog(argv):
        known = ", ".join(" ".join(c) for c in CATALOG_COMMANDS)
        raise BadInput(f"cells apply takes a change of the catalog ({known}); for other commands: cells each")
    key = change_key(argv)
    cells = load_cell_map(settings).cells
    states = catalog_states(settings, cells)
    done = [c.name for c in cells if states[c.name].change == key]
    pending = [c for c in cells if c.name not in done]
    _one_catalog(states, [*done, *(c.name for c in pending)], done)
    for name in done:
        print(f"[{name}] already applied: catalog {states[name].shown()}")
    for cell in pending:
        before = states[cell.name]
        print(f"[{cell.name}]", flush=True)
        sub = args.build_parser().parse_args(argv)
        try:
            with catalog.expecting(before, key):
                sub.func(sub, cell_settings(settings, cell))
        except Exception as exc:
            if not done:
                raise CellCommandError(f"cell {cell.name}: {exc}; no cell changed") from exc
            without = [c.name for c in pending if c.name not in done]
            raise CellCommandError(
                f"cell {cell.name}: {exc}; applied in: {', '.join(done)};"
                f" not in: {', '.join(without)}; run the same command again to complete it"
            ) from exc
        after = catalog_states(settings, [cell])[cell.name]
        print(f"[{cell.name}] catalog version {before.version} -> {after.version}")
        done.append(cell.name)
    return 0


def cmd_init(args: argparse.Namespace, settings: Settings) -> int:
    from issuance.shared.db import cells as db

    cells = load_cell_map(settings)
    with _conns(cells.cells) as conns:
        for cell in cells.cells:
            with conns[cell.name].transaction():
                try:
                    lo, hi = db.init_member_ids(conns[cell.name], cell.number)
                except db.CellError as exc:
                    raise CellCommandError(f"cell {cell.name}: {exc}") from None
            print(f"{cell.name}: member IDs {lo}-{hi}")
    return 0


def cmd_split(args: argparse.Namespace, settings: Settings) -> int:
    """Each cell gets a disjoint range of the activity's slots and a disjoint
    share of each listed template's codes. Every cell's change is made in its
    own transaction, and the transactions are committed only once all of them
    succeeded (a commit failing half-way is put right by running split again:
    it only refuses once a cell has issued packages)."""
    import psycopg
    from issuance.shared.db import cells as db

    cells = load_cell_map(settings)
    names = [c.name for c in cells.cells]
    budgets = split_evenly(args.budget, len(names))
    codes = _pairs(args.codes, "--codes")
    with _conns(cells.cells) as conns:
        try:
            pools = {
                prefix: db.draw_codes(prefix, count, db.existing_codes(conns.values(), prefix))
                for prefix, count in codes.items()
            }
            for name, slots in zip(names, slot_ranges(budgets), strict=True):
                db.set_slots(conns[name], args.slug, slots)
            for prefix, pool in pools.items():
                start = 0
                for name, share in zip(names, db.shares_of(len(pool), budgets), strict=True):
                    if share:
                        db.put_codes(conns[name], prefix, pool[start : start + share])
                    start += share
        except (db.CellError, ValueError, psycopg.Error) as exc:
            for conn in conns.values():
                conn.rollback()
            raise _refusing(exc) from None
        for conn in conns.values():
            conn.commit()
    for name, budget, slots in zip(names, budgets, slot_ranges(budgets), strict=True):
        extra = "".join(
            f", {share} {prefix} codes"
            for prefix, pool in codes.items()
            for n, share in zip(names, db.shares_of(pool, budgets), strict=True)
            if n == name
        )
        print(f"{name}: {args.slug} budget {budget}, slots {slots.start}-{slots.stop - 1}{extra}")
    return 0


def _donor_slots(settings: Settings, slug: str, count: int) -> list[int]:
    """Shrink the donor's budget by ``count`` free slots, through the back
    office's own budget edit (which refuses to go below what is issued);
    committed before the receiver grows. Returns the freed slot numbers."""
    from issuance.shared.backoffice import catalog
    from issuance.shared.db import cells as db
    from issuance.shared.db import database
    from sqlalchemy.orm import Session

    with Session(database.engine(settings)) as session, session.begin():
        raw = session.connection().connection.driver_connection
        assert raw is not None
        try:
            activity_id, budget = db.activity_row(raw, slug, lock=True)
        except db.CellError as exc:
            raise CellCommandError(str(exc)) from None
        if count > budget:
            raise CellCommandError(f"{slug} has a budget of {budget} in the donor: cannot move {count}")
        before = db.slot_numbers(raw, activity_id)
        catalog.update_activity(session, slug, {"budget": budget - count})
        session.flush()
        return sorted(before - db.slot_numbers(raw, activity_id))


def cmd_move(args: argparse.Namespace, settings: Settings) -> int:
    """Move free slots and unbound codes from one cell to another while
    claims run: the donor gives them up (committed), then the receiver gets
    them. Between the two, they are in neither cell: never in both."""
    from issuance.shared.db import cells as db

    cells = load_cell_map(settings)
    try:
        donor, receiver = cells.by_name(args.source), cells.by_name(args.target)
    except CellMapError as exc:
        raise BadInput(str(exc)) from None
    if donor.name == receiver.name:
        raise BadInput("--from and --to name the same cell")
    codes = _pairs(args.codes, "--codes")
    moved: list[int] = []
    if args.restore:
        moved = [int(n) for n in args.restore.split(",") if n.strip()]
    elif args.slots:
        moved = _donor_slots(cell_settings(settings, donor), args.slug, args.slots)
    taken: dict[str, list[str]] = {}
    with _conns([donor, receiver]) as conns:
        if codes:
            with conns[donor.name].transaction():
                try:
                    taken = {p: db.take_codes(conns[donor.name], p, n) for p, n in codes.items()}
                except db.CellError as exc:
                    raise CellCommandError(f"{donor.name}: {exc}") from None
        try:
            with conns[receiver.name].transaction():
                budget = db.receive_slots(conns[receiver.name], args.slug, moved) if moved else None
                for prefix, pool in taken.items():
                    if pool:
                        db.put_codes(conns[receiver.name], prefix, pool)
        except Exception as exc:
            codes_lost = sum(map(len, taken.values()))
            restore = f"cells move {args.slug} --from {donor.name} --to {receiver.name}"
            raise CellCommandError(
                f"{donor.name} gave up slots {format_slots(moved) or 'none'} and {codes_lost} codes"
                f" but {receiver.name} could not take them ({exc}); put the slots back with"
                f" {restore} --restore {','.join(map(str, moved))}"
            ) from None
    print(
        f"moved {len(moved)} slots of {args.slug} ({format_slots(moved) or 'none'})"
        + "".join(f", {len(pool)} {prefix} codes" for prefix, pool in taken.items())
        + f" from {donor.name} to {receiver.name}"
        + (f"; {receiver.name} budget now {budget}" if budget is not None else "")
    )
    return 0


def _handover_cells(args: argparse.Namespace, settings: Settings) -> tuple[Cell, Cell, tuple[int, ...]]:
    cells = load_cell_map(settings)
    try:
        donor, receiver = cells.by_name(args.source), cells.by_name(args.target)
        slots = parse_slots(args.slots)
    except CellMapError as exc:
        raise BadInput(str(exc)) from None
    if donor.name == receiver.name:
        raise BadInput("--from and --to name the same cell")
    if not slots:
        raise BadInput("--slots names no ring slot")
    return donor, receiver, slots


def _all_slotted(conn: Any, donor: Cell) -> None:
    from issuance.shared.db import cells as db

    unknown = db.unslotted_members(conn)
    if unknown:
        raise CellCommandError(
            f"{unknown} members of cell {donor.name} have no ring slot recorded (not seen since"
            " migration 0022): record them with `issuance cells ring-slots --numbers FILE`"
            " (their numbers, one a line) before handing ring slots over"
        )


def _in_cell(conn: Any, cell: Cell, work: Callable[[], Any]) -> Any:
    """``work`` in one transaction of ``cell``'s; its refusal named after the cell."""
    from issuance.shared.db import cells as db

    try:
        with conn.transaction():
            return work()
    except db.CellError as exc:
        raise CellCommandError(f"cell {cell.name}: {exc}") from None


def cmd_handover_begin(args: argparse.Namespace, settings: Settings) -> int:
    """First step of handing ring slots to another cell: the receiver keeps
    their claims undecided (retried) and the donor still decides them, so
    the new cell map can be rolled out in any order. Prints the new map."""
    from issuance.shared.cellmap import map_entries
    from issuance.shared.db import cells as db

    donor, receiver, slots = _handover_cells(args, settings)
    try:
        entries = handed_over(map_entries(settings), slots, donor.name, receiver.name)
    except CellMapError as exc:
        raise BadInput(str(exc)) from None
    with _conns([donor, receiver], autocommit=True) as conns:
        _all_slotted(conns[donor.name], donor)
        for cell in (receiver, donor):  # the receiver first: it holds before anything can reach it
            conn = conns[cell.name]
            with conn.transaction():
                try:
                    db.begin_handover(conn, slots, donor=donor.name, receiver=receiver.name, here=cell.name)
                except db.CellError as exc:
                    raise CellCommandError(f"cell {cell.name}: {exc}") from None
    text = json.dumps(entries, indent=2)
    if args.map_out:
        Path(args.map_out).write_text(text + "\n")
    else:
        print(text)
    print(
        f"handover of ring slots {format_slots(slots)} from {donor.name} to {receiver.name} begun:"
        f" {receiver.name} holds their claims, {donor.name} still decides them. Roll the new cell map"
        + (f" ({args.map_out})" if args.map_out else " (above)")
        + " out to the producers and workers, then run cells handover finish",
        file=sys.stderr if not args.map_out else sys.stdout,
    )
    return 0


def cmd_handover_finish(args: argparse.Namespace, settings: Settings) -> int:
    """Second step: the donor stops deciding the slots (after its decisions
    in flight), their members move to the receiver with what they hold, and
    the receiver decides them from then on; the donor dead-letters any claim
    of theirs that still reaches it (wrong_cell). Safe to run again."""
    from issuance.shared.db import cells as db

    donor, receiver, slots = _handover_cells(args, settings)
    names = {"donor": donor.name, "receiver": receiver.name}
    with _conns([donor, receiver], autocommit=True) as conns:
        give, take = conns[donor.name], conns[receiver.name]
        _all_slotted(give, donor)
        _in_cell(give, donor, lambda: db.set_handover_state(give, slots, "holding", **names))
        members = _in_cell(give, donor, lambda: db.leaving_members(give, slots))
        done = _in_cell(take, receiver, lambda: db.handovers(take, slots))
        if not all(h.state == "done" for h in done.values()) or len(done) < len(slots):

            def take_in() -> None:
                # The state first: its lock keeps the slots' claims waiting
                # until the members they need are in (one commit).
                db.set_handover_state(take, slots, "done", **names)
                db.take_in(take, members, donor=donor.name)

            _in_cell(take, receiver, take_in)

        def let_go() -> None:
            db.set_handover_state(give, slots, "done", **names)
            db.let_go(give, [m.member_id for m in members], receiver=receiver.name)

        _in_cell(give, donor, let_go)
    _remember_moved_grants(receiver, settings, members)
    print(
        f"handed ring slots {format_slots(slots)} from {donor.name} to {receiver.name}:"
        f" {len(members)} members with {sum(len(m.holdings) for m in members)} packages held;"
        f" {receiver.name} decides them, {donor.name} dead-letters them (wrong_cell)"
    )
    return 0


def _remember_moved_grants(receiver: Cell, settings: Settings, members: Sequence[Any]) -> None:
    """Tell the receiver's fast gate what the moved members hold, so its page
    answers "already claimed" at once (best effort: its workers refuse anyway)."""
    import redis
    from issuance.shared import gate

    grants = [(slug, group, m.phone_digest) for m in members if m.phone_digest for slug, group in m.holdings]
    if grants:
        client = redis.Redis.from_url(receiver.redis_url or settings.redis_url, socket_timeout=2.0)
        try:
            gate.remember_grants(client, grants)
        finally:
            client.close()


def cmd_ring_slots(args: argparse.Namespace, settings: Settings) -> int:
    """Record the ring slot of members created before migration 0022, from
    their numbers (one a line; the database keeps only keyed digests)."""
    from issuance.shared.db import cells as db
    from issuance.shared.domain import normalize_phone, phone_digests
    from issuance.shared.domain.cells import route_slot
    from issuance.shared.settings import require_phone_keys

    keys = require_phone_keys(settings)
    ring: dict[bytes, int] = {}
    bad = 0
    for line in Path(args.numbers).read_text().splitlines():
        if not line.strip():
            continue
        try:
            e164 = normalize_phone(line.strip(), settings.default_region)
        except ValueError:
            bad += 1
            continue
        for _, digest in phone_digests(e164, keys.secrets):
            ring[digest] = route_slot(e164)
    with _conns(load_cell_map(settings).cells, autocommit=True) as conns:
        for name, conn in conns.items():
            with conn.transaction():
                db.record_ring_slots(conn, ring)
            print(f"{name}: {db.unslotted_members(conn)} members without a ring slot left")
    if bad:
        print(f"{bad} lines were not phone numbers")
    return 0


def verify_all(args: argparse.Namespace, settings: Settings) -> int:
    """``issuance verify --cells`` and ``issuance cells verify``."""
    from issuance.shared.db import cells as db

    cells = load_cell_map(settings)
    totals = _pairs(getattr(args, "budget", None), "--budget")
    catalogs = {name: (s.version, s.digest) for name, s in catalog_states(settings, cells.cells).items()}
    with _conns(cells.cells) as conns:
        report = db.verify_cells(
            conns,
            cells.cells,
            grace=timedelta(seconds=settings.reconcile_grace_seconds),
            totals=totals,
            catalogs=catalogs,
        )
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
        return 0 if report.clean else 1
    for name, cell_report in report.cells.items():
        counts = ", ".join(f"{k}={v}" for k, v in cell_report.counts.items())
        print(f"[{name}] {counts}")
        for check, rows in cell_report.breaches.items():
            if rows:
                print(f"[{name}] BREACH {check}: {len(rows)} e.g. {rows[:3]}")
        print(f"[{name}] " + ("clean" if cell_report.clean else "BREACHES FOUND"))
    for slug, per_cell in sorted(report.granted.items()):
        print(f"{slug}: granted {sum(per_cell.values())} of {report.totals[slug]} ({_by_cell(per_cell)})")
    for check, rows in report.breaches.items():
        if rows:
            print(f"BREACH {check}: {len(rows)} e.g. {rows[:3]}")
    print("verify across cells: clean" if report.clean else "verify across cells: BREACHES FOUND")
    return 0 if report.clean else 1


BREAKDOWN = (
    ("offered", "packages_offered"),
    ("claimed", "packages_claimed"),
    ("remaining", "packages_remaining"),
    ("requested", "claims_requested"),
    ("refused", "claims_refused"),
    ("credited", "claims_credited"),
    ("coupons", "coupons_claimed"),
    ("used", "coupons_used"),
)


def report_all(args: argparse.Namespace, settings: Settings) -> int:
    """``issuance report`` with a cell map: the figures summed over every
    cell (templates by prefix), and with ``--by-cell`` each cell's share."""
    from issuance.shared.backoffice import reports

    cells = load_cell_map(settings)
    per_cell: dict[str, ActivityReport] = {}
    with _conns(cells.cells) as conns:
        for name, conn in conns.items():
            try:
                if args.channel:
                    per_cell[name] = reports.channel_report(conn, args.channel)
                else:
                    per_cell[name] = reports.activity_report(conn, args.activity)
            except reports.UnknownActivity:
                continue  # named below: not created in this cell
    if not per_cell:
        what = f"activity on channel {args.channel!r}" if args.channel else f"activity {args.activity!r}"
        raise reports.UnknownActivity(f"no {what} in any cell")
    total = over_cells(list(per_cell.values()))
    missing = [name for name in cells.names if name not in per_cell]
    if args.json:
        data = {**total.as_json(), "missing_in_cells": missing}
        if args.by_cell:
            data["cells"] = {name: r.as_json() for name, r in per_cell.items()}
        print(json.dumps(data, indent=2))
        return 0
    print(reports.render_table(total))
    if missing:
        print(f"\nnot in cells: {', '.join(missing)}")
    if args.by_cell:
        width = max(len(name) for name in per_cell)
        print("\n" + "  ".join(["cell".ljust(width), *(f"{h:>9}" for h, _ in BREAKDOWN)]))
        for name, r in per_cell.items():
            print("  ".join([name.ljust(width), *(f"{getattr(r, f):>9}" for _, f in BREAKDOWN)]))
    return 0


def over_cells(parts: Sequence[ActivityReport]) -> ActivityReport:
    """One activity's (or channel's) reports of several cells as one: the
    same template in every cell is one row, its counts summed."""
    from issuance.shared.backoffice import reports

    counts = ("generated", "available", "issued", "used", "expired", "cancelled")
    merged: dict[str, reports.TemplateStock] = {}
    for stock in (t for r in parts for t in r.templates):
        seen = merged.get(stock.prefix)
        merged[stock.prefix] = (
            stock
            if seen is None
            else dataclasses.replace(seen, **{f: getattr(seen, f) + getattr(stock, f) for f in counts})
        )
    first = parts[0]
    return reports.summed(
        parts, slug=first.slug, title=first.title, channel=first.channel, templates=tuple(merged.values())
    )


def _by_cell(values: dict[str, int]) -> str:
    return ", ".join(f"{cell} {n}" for cell, n in values.items())


def add_budget_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--budget",
        action="append",
        metavar="SLUG=N",
        help="an activity's platform budget (default: the sum of its cells' budgets)",
    )


def register(sub: Any, *, build_parser: Callable[[], Any], redact: Callable[[str], str]) -> None:
    """The ``cells`` commands; ``build_parser`` and ``redact`` are the command
    line's own (``cells each`` parses the command it runs per cell)."""
    group = sub.add_parser("cells", help="cells: the cell map, budgets split over cells, checks across cells")
    cells = group.add_subparsers(dest="cells_command", required=True)
    show = cells.add_parser("show", help="the cell map: cells, ring slots, services")
    show.set_defaults(func=cmd_show, redact=redact)
    each = cells.add_parser("each", help="run an issuance command in every cell (cells each -- db upgrade)")
    each.add_argument("argv", nargs=argparse.REMAINDER, help="the command and its options")
    each.set_defaults(func=cmd_each, build_parser=build_parser)
    apply = cells.add_parser(
        "apply",
        help="apply a change of the catalog to every cell, checking first that the cells agree"
        " (cells apply -- activity create --file x.yaml)",
    )
    apply.add_argument("argv", nargs=argparse.REMAINDER, help="the command and its options")
    apply.set_defaults(func=cmd_apply, build_parser=build_parser)
    cells.add_parser("init", help="bound each cell's member IDs to its range").set_defaults(func=cmd_init)
    split = cells.add_parser("split", help="split an activity's budget and code pools over the cells")
    split.add_argument("slug", help="the activity, created in every cell (cells each -- activity create)")
    split.add_argument("--budget", type=int, required=True, help="the platform budget")
    split.add_argument(
        "--codes", action="append", metavar="PREFIX=COUNT", help="codes to generate and share out"
    )
    split.set_defaults(func=cmd_split)
    move = cells.add_parser("move", help="move free slots and unbound codes from one cell to another")
    move.add_argument("slug", help="the activity")
    move.add_argument("--from", dest="source", required=True, help="the donor cell")
    move.add_argument("--to", dest="target", required=True, help="the receiving cell")
    move.add_argument("--slots", type=int, default=0, help="how many free slots to move")
    move.add_argument("--codes", action="append", metavar="PREFIX=COUNT", help="unbound codes to move")
    move.add_argument("--restore", help="slot numbers a failed move left in neither cell")
    move.set_defaults(func=cmd_move)
    handover = cells.add_parser("handover", help="hand ring slots (their members) from one cell to another")
    steps = handover.add_subparsers(dest="handover_step", required=True)
    for step, func, text in (
        ("begin", cmd_handover_begin, "the receiver holds the slots' claims; prints the new cell map"),
        ("finish", cmd_handover_finish, "move the slots' members and what they hold; the receiver decides"),
    ):
        parser = steps.add_parser(step, help=text)
        parser.add_argument("--slots", required=True, help="ring slots, e.g. 768-1023")
        parser.add_argument("--from", dest="source", required=True, help="the donor cell")
        parser.add_argument("--to", dest="target", required=True, help="the receiving cell")
        if step == "begin":
            parser.add_argument("--map-out", help="write the new cell map here instead of printing it")
        parser.set_defaults(func=func)
    ring = cells.add_parser("ring-slots", help="record members' ring slots from their numbers")
    ring.add_argument("--numbers", required=True, help="a file of phone numbers, one a line")
    ring.set_defaults(func=cmd_ring_slots)
    verify = cells.add_parser("verify", help="verify every cell and the whole; non-zero exit on a breach")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    add_budget_option(verify)
    verify.set_defaults(func=verify_all)
