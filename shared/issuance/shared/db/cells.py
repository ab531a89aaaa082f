"""Cells in the database: member-ID ranges, budgets and code pools split over
cells, free slots and unbound codes moved between them, and the checks that
span cells.

An activity exists in every cell (same slug, templates, prefixes). Its
package slots are numbered once for the platform, ``0 .. budget - 1``, and
each number lives in exactly one cell: a split hands each cell a disjoint
range, a move deletes free slots in the donor (committed) before inserting
the same numbers in the receiver. A crash between the two steps loses those
slots from both cells, which can only lower the sum, never raise it; the
move prints the numbers so they can be put back (``cells move --restore``).

Codes are generated centrally, in one process, drawn until none is already
in any cell, and handed out as disjoint shares; a move deletes available
codes in the donor before inserting them in the receiver. So a code is in
at most one cell at any instant, and the codes keep the format members and
the checkout already know (a cell mark would be wrong after a move anyway).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import psycopg
from issuance.shared import domain
from issuance.shared.domain.cells import Cell, format_slots, member_cell_number, member_id_range
from issuance.shared.errors import ServiceUnavailable

Conn = psycopg.Connection[Any]


class CellError(ValueError):
    """A cell operation that must not run (the message says why)."""


# -- member IDs --------------------------------------------------------------


def init_member_ids(conn: Conn, number: int) -> tuple[int, int]:
    """Bound the cell's member identity to its range (members of another cell
    can then never get the same ID). Refuses if members outside it exist."""
    lo, hi = member_id_range(number)
    # Members moved in by a handover keep the ID their first cell gave them.
    row = conn.execute(
        "SELECT count(*) FROM members WHERE member_id NOT BETWEEN %s AND %s AND moved_from IS NULL", (lo, hi)
    ).fetchone()
    if row and row[0]:
        raise CellError(f"{row[0]} members have IDs outside cell number {number}'s range {lo}-{hi}")
    top = conn.execute(
        "SELECT coalesce(max(member_id), 0) FROM members WHERE member_id BETWEEN %s AND %s", (lo, hi)
    ).fetchone()
    nxt = max(lo, int(top[0]) + 1 if top else lo)
    conn.execute(
        f"ALTER TABLE members ALTER COLUMN member_id SET MINVALUE {lo} SET MAXVALUE {hi}"
        f" SET START WITH {lo} RESTART WITH {nxt}"
    )
    return lo, hi


# -- activities --------------------------------------------------------------


def activity_row(conn: Conn, slug: str, *, lock: bool = False) -> tuple[int, int]:
    row = conn.execute(
        "SELECT activity_id, budget FROM activities WHERE slug = %s" + (" FOR UPDATE" if lock else ""),
        (slug,),
    ).fetchone()
    if row is None:
        raise CellError(f"no activity {slug!r} in this cell (create it in every cell first)")
    return int(row[0]), int(row[1])


def _template(conn: Conn, prefix: str) -> int:
    row = conn.execute("SELECT template_id FROM coupon_templates WHERE prefix = %s", (prefix,)).fetchone()
    if row is None:
        raise CellError(f"no coupon template with prefix {prefix!r} in this cell")
    return int(row[0])


def set_slots(conn: Conn, slug: str, slots: range) -> None:
    """Give a cell exactly ``slots`` of an activity (before any claim)."""
    activity_id, _ = activity_row(conn, slug, lock=True)
    row = conn.execute(
        "SELECT count(*) FROM claims WHERE activity_id = %s AND status <> 'refused'", (activity_id,)
    ).fetchone()
    if row and row[0]:
        raise CellError(
            f"{slug} has {row[0]} packages issued in this cell: split only before claims; use cells move"
        )
    conn.execute("DELETE FROM package_slots WHERE activity_id = %s", (activity_id,))
    add_slot_numbers(conn, activity_id, list(slots))
    conn.execute("UPDATE activities SET budget = %s WHERE activity_id = %s", (len(slots), activity_id))


def add_slot_numbers(conn: Conn, activity_id: int, numbers: Sequence[int]) -> None:
    conn.execute(
        "INSERT INTO package_slots (activity_id, slot_no) SELECT %s, unnest(%s::int[])",
        (activity_id, list(numbers)),
    )


def slot_numbers(conn: Conn, activity_id: int) -> set[int]:
    rows = conn.execute("SELECT slot_no FROM package_slots WHERE activity_id = %s", (activity_id,)).fetchall()
    return {int(r[0]) for r in rows}


def receive_slots(conn: Conn, slug: str, numbers: Sequence[int]) -> int:
    """The receiver's half of a move: the donor's slot numbers and budget."""
    activity_id, budget = activity_row(conn, slug, lock=True)
    add_slot_numbers(conn, activity_id, numbers)
    conn.execute(
        "UPDATE activities SET budget = %s WHERE activity_id = %s", (budget + len(numbers), activity_id)
    )
    return budget + len(numbers)


# -- codes -------------------------------------------------------------------

TAKE_CODES = """
WITH gone AS (
    DELETE FROM codes WHERE code IN (
        SELECT code FROM codes WHERE template_id = %s AND status = 'available'
         ORDER BY seq DESC LIMIT %s FOR UPDATE SKIP LOCKED)
    RETURNING code, batch_id)
SELECT code, batch_id FROM gone
"""


def take_codes(conn: Conn, prefix: str, count: int) -> list[str]:
    """The donor's half of a move: remove up to ``count`` available codes
    (their batches shrink with them, so batch sizes still add up)."""
    template_id = _template(conn, prefix)
    rows = conn.execute(TAKE_CODES, (template_id, count)).fetchall()
    per_batch: dict[int, int] = {}
    for _, batch_id in rows:
        per_batch[int(batch_id)] = per_batch.get(int(batch_id), 0) + 1
    for batch_id, n in per_batch.items():
        conn.execute("UPDATE code_batches SET size = size - %s WHERE batch_id = %s", (n, batch_id))
    return [str(r[0]) for r in rows]


def put_codes(conn: Conn, prefix: str, codes: Sequence[str]) -> int:
    """Insert ``codes`` as a new batch of the template with ``prefix``; the
    primary key refuses any already in this cell. Returns the batch ID."""
    template_id = _template(conn, prefix)
    row = conn.execute(
        "INSERT INTO code_batches (template_id, size) VALUES (%s, %s) RETURNING batch_id",
        (template_id, len(codes)),
    ).fetchone()
    assert row is not None
    batch_id = int(row[0])
    suffix = f"\t{template_id}\t{batch_id}\n"
    with conn.cursor().copy("COPY codes (code, template_id, batch_id) FROM STDIN") as copy:
        copy.write("".join(code + suffix for code in sorted(codes)))
    return batch_id


def existing_codes(conns: Iterable[Conn], prefix: str) -> set[str]:
    found: set[str] = set()
    for conn in conns:
        rows = conn.execute(
            "SELECT c.code FROM codes c JOIN coupon_templates t USING (template_id) WHERE t.prefix = %s",
            (prefix,),
        ).fetchall()
        found.update(str(r[0]) for r in rows)
    return found


def draw_codes(
    prefix: str, count: int, taken: set[str], bits: int = domain.DEFAULT_CODE_RANDOM_BITS
) -> list[str]:
    """``count`` new codes, none in ``taken`` and none twice (CSPRNG)."""
    domain.check_capacity(prefix, len(taken), count, bits)
    made: set[str] = set()
    while len(made) < count:
        made.update(c for c in domain.new_codes(prefix, count - len(made), bits) if c not in taken)
    return sorted(made)


def shares_of(total: int, weights: Sequence[int]) -> list[int]:
    """``total`` in proportion to ``weights`` (largest remainder), summing to it."""
    whole = sum(weights)
    if whole == 0:
        return [total // len(weights) + (1 if i < total % len(weights) else 0) for i in range(len(weights))]
    exact = [total * w / whole for w in weights]
    parts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - parts[i], reverse=True)
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts


# -- checks over all cells ---------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CellsReport:
    cells: dict[str, Any]  # cell name -> its verify Report
    granted: dict[str, dict[str, int]]  # slug -> cell -> granted packages
    budgets: dict[str, dict[str, int]]  # slug -> cell -> budget
    totals: dict[str, int]  # slug -> the platform budget checked against
    breaches: dict[str, list[list[str]]]

    @property
    def clean(self) -> bool:
        return not any(self.breaches.values()) and all(r.clean for r in self.cells.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "cells": {name: report.as_json() for name, report in self.cells.items()},
            "granted": self.granted,
            "budgets": self.budgets,
            "totals": self.totals,
            "breaches": {name: len(rows) for name, rows in self.breaches.items()},
            "examples": {name: rows[:5] for name, rows in self.breaches.items() if rows},
        }


def _in_two(sets: Mapping[str, set[Any]]) -> list[list[str]]:
    """Values found in more than one cell, with the cells."""
    where: dict[Any, list[str]] = {}
    for cell, values in sets.items():
        for value in values:
            where.setdefault(value, []).append(cell)
    return [[_show(v), *cells] for v, cells in where.items() if len(cells) > 1]


def _show(value: Any) -> str:
    if isinstance(value, bytes):
        return value.hex()[:16]
    return str(value)


def _activity_figures(
    conns: Mapping[str, Conn],
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]], dict[str, set[tuple[str, int]]]]:
    """Per slug and cell: granted packages and budget; per cell: its slots."""
    granted: dict[str, dict[str, int]] = {}
    budgets: dict[str, dict[str, int]] = {}
    slots: dict[str, set[tuple[str, int]]] = {}
    for name, conn in conns.items():
        for slug, budget, count in conn.execute(ACTIVITY_FIGURES).fetchall():
            budgets.setdefault(slug, {})[name] = int(budget)
            granted.setdefault(slug, {})[name] = int(count)
        slots[name] = {(str(s), int(n)) for s, n in conn.execute(CELL_SLOTS).fetchall()}
    return granted, budgets, slots


ACTIVITY_FIGURES = """
SELECT a.slug, a.budget,
       (SELECT count(*) FROM claims k WHERE k.activity_id = a.activity_id AND k.status <> 'refused')
  FROM activities a"""
CELL_SLOTS = "SELECT a.slug, s.slot_no FROM package_slots s JOIN activities a USING (activity_id)"
# What must never be in two cells: (check, query of the values). A member
# handed over to another cell stays in its old cell as history (moved_to):
# it is active, decided, in one cell only.
UNIQUE_ACROSS_CELLS = {
    "phone_digest_in_two_cells": (
        "SELECT phone_digest FROM members WHERE phone_digest IS NOT NULL AND moved_to IS NULL"
    ),
    "member_id_in_two_cells": "SELECT member_id FROM members WHERE moved_to IS NULL",
    "code_in_two_cells": "SELECT code FROM codes",
}
# What a handover must never leave in a cell: (check, query of examples).
HANDOVER_CHECKS = {
    # Decided in the cell it had left: the cell it went to decides without it.
    "decided_after_moving_out": """
SELECT k.claim_id::text, k.member_id::text FROM claims k JOIN members m USING (member_id)
 WHERE m.moved_to IS NOT NULL AND k.decided_at > m.moved_at LIMIT 100""",
    # A second package of an activity or exclusivity group the member held
    # in the cell it came from.
    "package_over_moved_holding": """
SELECT k.claim_id::text, k.member_id::text FROM claims k JOIN member_holdings h USING (member_id)
 WHERE k.status <> 'refused'
   AND (k.activity_slug = h.activity_slug OR k.exclusivity_group = h.exclusivity_group) LIMIT 100""",
    # A slot whose handover began and did not finish.
    "handover_unfinished": """
SELECT slot::text, from_cell, to_cell, state FROM ring_handovers WHERE state <> 'done' LIMIT 100""",
}
MOVED_OUT = "SELECT member_id, moved_to FROM members WHERE moved_to IS NOT NULL"


def _over(figures: Mapping[str, Mapping[str, int]], limits: Mapping[str, int]) -> list[list[str]]:
    return [
        [slug, str(sum(per_cell.values())), str(limits[slug])]
        for slug, per_cell in figures.items()
        if sum(per_cell.values()) > limits[slug]
    ]


def verify_cells(
    conns: Mapping[str, Conn],
    cells: Sequence[Cell],
    *,
    grace: timedelta,
    totals: Mapping[str, int] | None = None,
    catalogs: Mapping[str, tuple[int, str]] | None = None,
) -> CellsReport:
    """Each cell's own verify (with its broker's acceptance ledger, where it
    has one), then what only the whole can show: grants over all cells within
    the platform budget (``totals``, or the sum of the cells' budgets), no
    package slot, phone digest, member ID or code in two cells, each cell's
    members inside its member-ID range, every referral for a referrer of
    another cell held by that cell; with ``catalogs`` (cell -> catalog
    version and digest), every cell with the same catalog digest."""
    totals = totals or {}
    reports = {cell.name: _cell_verify(conns[cell.name], cell, grace) for cell in cells}
    granted, budgets, slots = _activity_figures(conns)
    limits = {slug: totals.get(slug, sum(b.values())) for slug, b in budgets.items()}
    breaches: dict[str, list[list[str]]] = {
        "granted_over_platform_budget": _over(granted, limits),
        "cell_budgets_over_platform_budget": _over(budgets, limits),
        # Slot numbers are platform-wide: with the platform budget given, a
        # number at or past it is a package the platform never had.
        "slot_outside_platform_budget": sorted(
            [cell, slug, str(n)]
            for cell, pairs in slots.items()
            for slug, n in pairs
            if slug in totals and n >= limits[slug]
        )[:100],
        "slot_in_two_cells": _in_two(slots)[:100],
    }
    for check, sql in UNIQUE_ACROSS_CELLS.items():
        values = {name: {_key(r[0]) for r in conn.execute(sql)} for name, conn in conns.items()}
        breaches[check] = _in_two(values)[:100]
    breaches.update(_crossed_referrals(conns, cells, grace))
    breaches["member_outside_cell_range"] = [
        [cell.name, str(member_id)]
        for cell in cells
        for (member_id,) in conns[cell.name].execute(
            "SELECT member_id FROM members WHERE member_id NOT BETWEEN %s AND %s"
            " AND moved_from IS NULL LIMIT 100",
            member_id_range(cell.number),
        )
    ]
    for check, sql in HANDOVER_CHECKS.items():
        breaches[check] = [
            [name, *map(str, row)] for name, conn in conns.items() for row in conn.execute(sql)
        ]
    breaches["moved_member_missing"] = _moved_missing(conns)
    catalogs = catalogs or {}
    breaches["catalog_differs_between_cells"] = (
        [[name, str(version), digest[:12]] for name, (version, digest) in catalogs.items()]
        if len({digest for _, digest in catalogs.values()}) > 1
        else []
    )
    return CellsReport(cells=reports, granted=granted, budgets=budgets, totals=limits, breaches=breaches)


def _moved_missing(conns: Mapping[str, Conn]) -> list[list[str]]:
    """Members a cell handed over that the cell they went to does not have
    (their holdings would be missing there)."""
    members = {
        name: {int(r[0]) for r in conn.execute("SELECT member_id FROM members")}
        for name, conn in conns.items()
    }
    return [
        [name, str(member_id), str(moved_to)]
        for name, conn in conns.items()
        for member_id, moved_to in conn.execute(MOVED_OUT)
        if int(member_id) not in members.get(str(moved_to), set())
    ][:100]


# A cell's referrals whose referrer is of another cell, settled longer than
# the grace period ago (counted, and reversed if they are): the referrer's
# cell must hold each, in the same state, in cell_referrals.
CROSSED_OUT = """
SELECT referee_member_id, referrer_member_id, reversed_at IS NOT NULL FROM referrals
 WHERE referrer_member_id NOT BETWEEN %(lo)s AND %(hi)s AND counted_at < now() - %(grace)s
   AND (reversed_at IS NULL OR reversed_at < now() - %(grace)s)
"""
CROSSED_IN = "SELECT referee_member_id, referrer_member_id, reversed_at IS NOT NULL FROM cell_referrals"
CROSSED_SOURCES = "SELECT referee_member_id, referrer_member_id FROM referrals"


def _crossed_referrals(
    conns: Mapping[str, Conn], cells: Sequence[Cell], grace: timedelta
) -> dict[str, list[list[str]]]:
    """Referrals counted in the referee's cell for a referrer of another cell
    (issuance.workers.cell_referrals): each in the referrer's cell, in the same
    state (``referral_not_in_referrers_cell``), and nothing there that the
    referee's cell did not count (``crossed_referral_without_referral``)."""
    by_number = {cell.number: cell.name for cell in cells}

    def home(member_id: int) -> str | None:
        return by_number.get(member_cell_number(member_id))

    received = {cell.name: set(conns[cell.name].execute(CROSSED_IN).fetchall()) for cell in cells}
    missing: list[list[str]] = []
    sources: dict[str, set[tuple[int, int]]] = {}
    for cell in cells:
        lo, hi = member_id_range(cell.number)
        params = {"lo": lo, "hi": hi, "grace": grace}
        for referee, referrer, reversed_ in conns[cell.name].execute(CROSSED_OUT, params).fetchall():
            there = home(referrer)
            if there is not None and (referee, referrer, reversed_) not in received[there]:
                missing.append([str(referee), cell.name, there])
        sources[cell.name] = set(conns[cell.name].execute(CROSSED_SOURCES).fetchall())
    unknown = [
        [str(referee), cell, str(home(referee))]
        for cell, rows in received.items()
        for referee, referrer, _ in rows
        if home(referee) is None or (referee, referrer) not in sources[home(referee) or cell]
    ]
    return {
        "referral_not_in_referrers_cell": missing[:100],
        "crossed_referral_without_referral": unknown[:100],
    }


def _cell_verify(conn: Conn, cell: Cell, grace: timedelta) -> Any:
    """What ``issuance verify`` reports for the cell alone."""
    from issuance.shared.db.ledger import reconcile
    from issuance.shared.db.verify import verify, with_ledger
    from issuance.shared.wire.ledger import LedgerAbsent
    from issuance.shared.wire.publisher import CONNECTION_ERRORS

    report = verify(conn, grace=grace)
    try:
        ledger = reconcile(conn, cell.amqp_url, grace=grace, keep=100)
    except LedgerAbsent:
        return report
    except CONNECTION_ERRORS as exc:
        raise ServiceUnavailable(f"cell {cell.name}: its RabbitMQ vhost cannot be read ({exc!r})") from None
    return with_ledger(report, ledger.rows())


def _key(value: Any) -> Any:
    return bytes(value) if isinstance(value, memoryview) else value


# -- ring handovers ----------------------------------------------------------
#
# Ring slots go from a donor cell to a receiver in two steps, each cell
# keeping the state of its side in its own ring_handovers table (which
# overrides the cell map of a process for the slots it names, so workers
# with the old map and workers with the new one act alike):
#
#   begin:  receiver 'holding' (its workers keep the slots' claims, retried,
#           undecided); donor 'leaving' (it still decides them).
#   finish: donor 'holding' (waits for its decisions in flight), the
#           members of the slots copied to the receiver with what they hold,
#           receiver 'done' (decides them), donor 'done' (dead-letters them
#           as wrong_cell).
#
# A claim is decided only where the state says so, read in the deciding
# transaction under a SHARE lock that a state change waits for: no member is
# decided in two cells, and none in the receiver before its history is.


class Verdict(enum.StrEnum):
    DECIDE = "decide"
    # Not yet: retried until the handover moves on.
    HOLD = "hold"
    # Handed over: this cell decides these slots no more.
    GONE = "gone"


@dataclasses.dataclass(frozen=True, slots=True)
class Handover:
    slot: int
    from_cell: str
    to_cell: str
    state: str

    def verdict(self, here: str) -> Verdict:
        if self.to_cell == here:
            return Verdict.DECIDE if self.state == "done" else Verdict.HOLD
        if self.state == "leaving":
            return Verdict.DECIDE
        return Verdict.GONE if self.state == "done" else Verdict.HOLD


HANDOVERS = "SELECT slot, from_cell, to_cell, state FROM ring_handovers WHERE slot = ANY(%b::smallint[])"
# Decisions share the lock; a change of state (SHARE ROW EXCLUSIVE) waits
# for the decisions in flight and blocks new ones until it commits.
GUARD = "LOCK TABLE ring_handovers IN SHARE MODE"
CHANGE = "LOCK TABLE ring_handovers IN SHARE ROW EXCLUSIVE MODE"


def handovers(conn: Conn, slots: Iterable[int]) -> dict[int, Handover]:
    """This cell's handover state of ``slots`` (those it has one for)."""
    rows = conn.execute(HANDOVERS, (sorted(set(slots)),), prepare=False)
    return {int(r[0]): Handover(int(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in rows}


def slot_verdicts(conn: Conn, here: str, slots: Iterable[int]) -> dict[int, Verdict]:
    """Inside a deciding transaction: the slots among ``slots`` this cell
    must not decide now (the others: as the cell map says)."""
    conn.execute(GUARD)
    found = handovers(conn, slots)
    return {slot: v for slot, h in found.items() if (v := h.verdict(here)) is not Verdict.DECIDE}


RECORD_RING_SLOTS = """
UPDATE members m SET ring_slot = u.slot
  FROM unnest(%b::bytea[], %b::smallint[]) AS u(digest, slot)
 WHERE m.phone_digest = u.digest AND m.ring_slot IS NULL
"""


def record_ring_slots(conn: Conn, slots: Mapping[bytes, int]) -> None:
    """Record the ring slot of the members behind these phone digests (once)."""
    if slots:
        digests = sorted(slots)
        conn.execute(RECORD_RING_SLOTS, (digests, [slots[d] for d in digests]), prepare=False)


def begin_handover(conn: Conn, slots: Sequence[int], *, donor: str, receiver: str, here: str) -> None:
    """Write this cell's side of a handover's first step (see above)."""
    conn.execute(CHANGE)
    found = handovers(conn, slots).values()
    busy = [h for h in found if h.state != "done"]
    if busy and any((h.from_cell, h.to_cell) != (donor, receiver) for h in busy):
        h = busy[0]
        raise CellError(f"slot {h.slot} is in a handover from {h.from_cell} to {h.to_cell} ({h.state})")
    # Handed already: the donor would decide again members it no longer has.
    done = [h for h in found if h.state == "done" and (h.from_cell, h.to_cell) == (donor, receiver)]
    if done:
        raise CellError(
            f"slots {format_slots([h.slot for h in done])} were handed from {donor} to {receiver} already"
        )
    state = "holding" if here == receiver else "leaving"
    conn.execute(
        """INSERT INTO ring_handovers (slot, from_cell, to_cell, state)
           SELECT unnest(%s::smallint[]), %s, %s, %s
           ON CONFLICT (slot) DO UPDATE SET from_cell = EXCLUDED.from_cell, to_cell = EXCLUDED.to_cell,
               state = EXCLUDED.state, updated_at = now()
           WHERE ring_handovers.state = 'done'""",
        (list(slots), donor, receiver, state),
    )


def set_handover_state(conn: Conn, slots: Sequence[int], state: str, *, donor: str, receiver: str) -> None:
    """Move this cell's side of the handover on; refuses if it did not begin."""
    conn.execute(CHANGE)
    found = handovers(conn, slots)
    missing = [
        s for s in slots if s not in found or (found[s].from_cell, found[s].to_cell) != (donor, receiver)
    ]
    if missing:
        raise CellError(
            f"slots {format_slots(missing)} have no handover from {donor} to {receiver}:"
            " run handover begin first"
        )
    conn.execute(
        "UPDATE ring_handovers SET state = %s, updated_at = now() WHERE slot = ANY(%s)", (state, list(slots))
    )


def unslotted_members(conn: Conn) -> int:
    """Members whose ring slot is not recorded (not seen since migration 0022)."""
    row = conn.execute("SELECT count(*) FROM members WHERE ring_slot IS NULL AND moved_to IS NULL").fetchone()
    return int(row[0]) if row else 0


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MovingMember:
    """A member as a handover carries it: its identity and what it holds."""

    member_id: int
    phone_digest: bytes | None
    phone_key_id: str
    phone_masked: str
    status: str
    created_at: Any
    registered_at: Any
    app_member_id: int | None
    ring_slot: int
    holdings: tuple[tuple[str, str], ...]  # (activity slug, exclusivity group)


LEAVERS = """
SELECT m.member_id, m.phone_digest, m.phone_key_id, m.phone_masked, m.status, m.created_at,
       m.registered_at, m.app_member_id, m.ring_slot,
       coalesce((SELECT array_agg(ARRAY[h.slug, h.grp] ORDER BY h.slug) FROM (
           SELECT k.activity_slug AS slug, k.exclusivity_group AS grp FROM claims k
            WHERE k.member_id = m.member_id AND k.status <> 'refused'
           UNION
           SELECT c.activity_slug, c.exclusivity_group FROM member_holdings c
            WHERE c.member_id = m.member_id) h), '{}')
  FROM members m
 WHERE m.ring_slot = ANY(%s) AND m.moved_to IS NULL
 ORDER BY m.member_id
"""


def leaving_members(conn: Conn, slots: Sequence[int]) -> list[MovingMember]:
    """The donor's members of ``slots`` with every package they hold here."""
    return [
        MovingMember(
            member_id=int(r[0]),
            phone_digest=None if r[1] is None else bytes(r[1]),
            phone_key_id=str(r[2]),
            phone_masked=str(r[3]),
            status=str(r[4]),
            created_at=r[5],
            registered_at=r[6],
            app_member_id=r[7],
            ring_slot=int(r[8]),
            holdings=tuple((str(slug), str(group)) for slug, group in r[9]),
        )
        for r in conn.execute(LEAVERS, (list(slots),), prepare=False)
    ]


TAKE_IN_MEMBER = """
INSERT INTO members (member_id, phone_digest, phone_key_id, phone_masked, status, created_at,
                     registered_at, app_member_id, ring_slot, moved_from, moved_at)
OVERRIDING SYSTEM VALUE
VALUES (%(member_id)s, %(phone_digest)s, %(phone_key_id)s, %(phone_masked)s, %(status)s, %(created_at)s,
        %(registered_at)s, %(app_member_id)s, %(ring_slot)s, %(donor)s, now())
ON CONFLICT (member_id) DO UPDATE
   SET moved_to = NULL, moved_from = EXCLUDED.moved_from, moved_at = now(),
       status = EXCLUDED.status, registered_at = EXCLUDED.registered_at, ring_slot = EXCLUDED.ring_slot
"""
TAKE_IN_HOLDING = """
INSERT INTO member_holdings (member_id, activity_slug, exclusivity_group, from_cell)
VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING
"""


def take_in(conn: Conn, members: Sequence[MovingMember], *, donor: str) -> int:
    """The receiver's half: the members under their own IDs, marked as moved
    in, and what they hold. Refuses a number this cell already has under
    another member ID (it was decided here without its history)."""
    digests = [m.phone_digest for m in members if m.phone_digest is not None]
    clash = conn.execute(
        "SELECT member_id FROM members WHERE phone_digest = ANY(%s) AND NOT member_id = ANY(%s) LIMIT 5",
        (digests, [m.member_id for m in members]),
    ).fetchall()
    if clash:
        raise CellError(
            f"members {', '.join(str(r[0]) for r in clash)} of this cell have the number of a member"
            f" coming from {donor}: they were decided here before the handover"
        )
    with conn.cursor() as cur:
        cur.executemany(TAKE_IN_MEMBER, [{**dataclasses.asdict(m), "donor": donor} for m in members])
        cur.executemany(
            TAKE_IN_HOLDING,
            [(m.member_id, slug, group, donor) for m in members for slug, group in m.holdings],
        )
    return len(members)


def let_go(conn: Conn, member_ids: Sequence[int], *, receiver: str) -> None:
    """The donor's half: its rows of the moved members become history."""
    conn.execute(
        "UPDATE members SET moved_to = %s, moved_at = now() WHERE member_id = ANY(%s)",
        (receiver, list(member_ids)),
    )
