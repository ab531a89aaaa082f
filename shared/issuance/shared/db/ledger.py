"""Reconcile the acceptance ledger against the database.

The ledger (:mod:`issuance.shared.wire.ledger`) holds every claim envelope a
producer published. An entry is *settled* once the database shows each of
its claims: a ``claims`` row (granted or refused) or a dead letter of the
claim or of its whole message. An entry older than the grace period and not
settled is a claim accepted and never recorded: its queue copy was lost
before its first row. ``issuance verify`` reports those
(``accepted_unrecorded``); the sweeper re-publishes their envelopes.

Where to start reading is a checkpoint in ``ledger_checkpoints``: the offset
of the first entry not known to be settled. It only moves forward, and only
past settled entries, so an unsettled one is read again on every pass until
something settles it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from issuance.shared.db.store import Conn
from issuance.shared.wire import codec
from issuance.shared.wire.ledger import Entry, LedgerRecreated, Unit, now_ms, read

log = logging.getLogger(__name__)

# Entries checked against the database per query.
CHUNK = 1000
# Unsettled entries kept (for the report, and for the sweeper to re-drive).
KEEP = 1000

GET_CHECKPOINT = "SELECT next_offset FROM ledger_checkpoints WHERE stream = %s"
ADVANCE = """
INSERT INTO ledger_checkpoints (stream, next_offset) VALUES (%s, %s)
ON CONFLICT (stream) DO UPDATE
   SET next_offset = greatest(ledger_checkpoints.next_offset, excluded.next_offset), updated_at = now()
"""
RECORDED = "SELECT claim_id FROM claims WHERE claim_id = ANY(%s)"
DEAD = "SELECT message_key FROM dead_letters WHERE message_key = ANY(%s)"
RESET = "DELETE FROM ledger_checkpoints WHERE stream = %s"


def is_settled(entry: Entry, recorded: set[Any], dead: set[str]) -> bool:
    """Whether the database shows every claim of ``entry``."""
    return all(_unit_settled(unit, recorded, dead) for unit in entry.units)


def _unit_settled(unit: Unit, recorded: set[Any], dead: set[str]) -> bool:
    return (unit.claim_id is not None and unit.claim_id in recorded) or any(k in dead for k in unit.dead_keys)


@dataclasses.dataclass(slots=True)
class Progress:
    """What a pass over the ledger found, entry by entry in offset order."""

    start: int | None
    keep: int = KEEP
    read: int = 0
    unsettled: int = 0
    # The checkpoint after this pass: the first unsettled offset, else past the last entry read.
    checkpoint: int | None = None
    kept: list[Entry] = dataclasses.field(default_factory=list)
    _blocked: bool = False

    def __post_init__(self) -> None:
        self.checkpoint = self.start

    def add(self, entry: Entry, settled: bool) -> None:
        self.read += 1
        if settled:
            if not self._blocked:
                self.checkpoint = entry.offset + 1
            return
        if not self._blocked:
            self.checkpoint = entry.offset
            self._blocked = True
        self.unsettled += 1
        if len(self.kept) < self.keep:
            self.kept.append(entry)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Reconciliation:
    """The ledger against the database: ``absent`` when there is no ledger."""

    absent: str = ""
    # Said when the checkpoint had to be reset (the stream was declared anew).
    note: str = ""
    start: int | None = None
    checkpoint: int | None = None
    read: int = 0
    unsettled: int = 0
    entries: tuple[Entry, ...] = ()

    def rows(self) -> list[list[str]]:
        """One row per claim not recorded: claim ID (or message ID), ledger
        offset and when it was accepted."""
        out = []
        for entry in self.entries:
            accepted = datetime.fromtimestamp(entry.accepted_ms / 1000, UTC).isoformat(timespec="seconds")
            for unit in entry.units:
                out.append([str(unit.claim_id or entry.message_id), str(entry.offset), accepted])
        return out

    def summary(self) -> str:
        if self.absent:
            return f"ledger: absent ({self.absent}): accepted claims are not reconciled"
        start = "its first entry" if self.start is None else f"offset {self.start}"
        note = f" ({self.note})" if self.note else ""
        return (
            f"ledger: {self.read} entries past the grace period read from {start},"
            f" {self.unsettled} not recorded; checkpoint now {self.checkpoint}{note}"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "absent": self.absent or None,
            "start": self.start,
            "checkpoint": self.checkpoint,
            "read": self.read,
            "unrecorded_entries": self.unsettled,
        }


def checkpoint(conn: Conn) -> int | None:
    row = conn.execute(GET_CHECKPOINT, (codec.LEDGER_QUEUE,)).fetchone()
    return None if row is None else int(row[0])


def advance(conn: Conn, offset: int) -> None:
    """Move the checkpoint forward to ``offset`` (never back)."""
    conn.execute(ADVANCE, (codec.LEDGER_QUEUE, offset))
    conn.commit()


def settled_flags(conn: Conn, entries: Sequence[Entry]) -> list[bool]:
    """For each of ``entries``, whether the database shows all its claims."""
    claim_ids = sorted({u.claim_id for e in entries for u in e.units if u.claim_id is not None})
    keys = sorted({k for e in entries for u in e.units for k in u.dead_keys})
    recorded = {row[0] for row in conn.execute(RECORDED, (claim_ids,))} if claim_ids else set()
    dead = {row[0] for row in conn.execute(DEAD, (keys,))} if keys else set()
    return [is_settled(e, recorded, dead) for e in entries]


def check(conn: Conn, entries: Iterable[Entry], progress: Progress) -> Progress:
    """Feed ``entries`` (in offset order) through ``progress``, ``CHUNK`` at a time."""
    chunk: list[Entry] = []
    for entry in entries:
        chunk.append(entry)
        if len(chunk) >= CHUNK:
            _check_chunk(conn, chunk, progress)
            chunk = []
    if chunk:
        _check_chunk(conn, chunk, progress)
    return progress


def _check_chunk(conn: Conn, chunk: list[Entry], progress: Progress) -> None:
    for entry, settled in zip(chunk, settled_flags(conn, chunk), strict=True):
        progress.add(entry, settled)


def reconcile(
    conn: Conn, amqp_url: str, *, grace: timedelta, keep: int = KEEP, now: int | None = None
) -> Reconciliation:
    """Read the ledger from the checkpoint up to the entries younger than
    ``grace``, check each against the database and advance the checkpoint
    past the settled prefix. Raises LedgerAbsent without a ledger, and
    pika's connection errors when RabbitMQ cannot be reached."""
    start = checkpoint(conn)
    conn.commit()  # no transaction held open while the stream is read
    until = (now if now is not None else now_ms()) - int(grace.total_seconds() * 1000)
    note = ""
    try:
        progress = check(conn, read(amqp_url, start, until_ms=until), Progress(start, keep=keep))
    except LedgerRecreated as exc:
        log.warning("%s: the stream was declared anew; reading it from its first entry", exc)
        note = f"{exc}, read again from the first"
        conn.execute(RESET, (codec.LEDGER_QUEUE,))
        conn.commit()
        start = None
        progress = check(conn, read(amqp_url, None, until_ms=until), Progress(None, keep=keep))
    conn.commit()
    if progress.checkpoint is not None and progress.checkpoint != start:
        advance(conn, progress.checkpoint)
    return Reconciliation(
        note=note,
        start=start,
        checkpoint=progress.checkpoint,
        read=progress.read,
        unsettled=progress.unsettled,
        entries=tuple(progress.kept),
    )
