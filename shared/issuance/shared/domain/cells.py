"""Cells: which cell a member's messages go to. Pure functions, no I/O.

A cell is one whole deployment (one PostgreSQL database, one broker vhost,
its workers). Members are spread over cells through a fixed ring of
:data:`RING_SLOTS` slots: a member's number hashes to a slot, and the cell
map names which slots each cell serves. Adding a cell hands it named slots
taken from the others; every other member stays where they are (a hash
modulo the number of cells would move nearly everyone).

The routing hash is SHA-256 of the E.164 number under a fixed label,
unkeyed, computed in memory and reduced to a slot number at once; it is
never stored, logged or sent. It must not be the keyed phone digest: the
phone key is rotated (key ids), and a rotation would then re-home members
away from the cell that holds their packages. Ten bits of an unkeyed hash
say nothing a reader of the cell map could not already guess.

Member IDs carry their cell: cell number ``n`` hands out IDs in
``[n * MEMBER_ID_SPAN + 1, (n + 1) * MEMBER_ID_SPAN)`` (the database's identity
sequence is bounded to that range by ``issuance cells init``), so an order or
a registration naming a member routes without a lookup, and IDs are unique
across cells.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence

RING_SLOTS = 1024
MAX_CELLS = 1024
# Member IDs per cell: 2^40 (a trillion) each, 2^63 in all.
MEMBER_ID_SPAN = 2**40
ROUTE_LABEL = b"issuance-cell-route-v1:"


class CellMapError(ValueError):
    """The cell map is not usable (a slot served twice or by nobody, ...)."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Cell:
    name: str
    number: int
    database_url: str
    amqp_url: str
    redis_url: str
    slots: tuple[int, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class CellMap:
    cells: tuple[Cell, ...]
    # ring[slot] = index into cells
    ring: tuple[int, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.cells)

    def by_name(self, name: str) -> Cell:
        for cell in self.cells:
            if cell.name == name:
                return cell
        raise CellMapError(f"no cell named {name!r}; cells: {', '.join(self.names)}")

    def cell_for_slot(self, slot: int) -> Cell:
        return self.cells[self.ring[slot]]

    def cell_for_phone(self, e164: str) -> Cell:
        return self.cell_for_slot(route_slot(e164))

    def cell_for_member(self, member_id: int) -> Cell:
        number = member_cell_number(member_id)
        for cell in self.cells:
            if cell.number == number:
                return cell
        raise CellMapError(
            f"member {member_id} belongs to cell number {number}, which is not in the cell map"
        )


def route_slot(e164: str) -> int:
    """The ring slot of a normalised number (see the module's note on keys)."""
    digest = hashlib.sha256(ROUTE_LABEL + e164.encode()).digest()
    return int.from_bytes(digest[:8], "big") % RING_SLOTS


def member_cell_number(member_id: int) -> int:
    return member_id // MEMBER_ID_SPAN


def member_id_range(number: int) -> tuple[int, int]:
    """The first and last member ID that cell number ``number`` hands out."""
    return number * MEMBER_ID_SPAN + 1, (number + 1) * MEMBER_ID_SPAN - 1


def parse_slots(text: str) -> tuple[int, ...]:
    """``"0-511,768-1023"`` -> the slot numbers; ``""``: none (a cell added
    to the map before a handover gives it slots)."""
    slots: list[int] = []
    if not text.strip():
        return ()
    for part in text.split(","):
        first, sep, last = part.strip().partition("-")
        try:
            lo, hi = int(first), int(last if sep else first)
        except ValueError:
            raise CellMapError(f"slots must be like 0-511,768-1023, got {text!r}") from None
        if not 0 <= lo <= hi < RING_SLOTS:
            raise CellMapError(f"slot range {part.strip()!r} is outside 0-{RING_SLOTS - 1}")
        slots.extend(range(lo, hi + 1))
    return tuple(slots)


def format_slots(slots: Sequence[int]) -> str:
    """The slot numbers as ranges, ``parse_slots``' inverse: ``"0-511,768"``."""
    parts: list[str] = []
    ordered = sorted(set(slots))
    start = 0
    for i, slot in enumerate(ordered):
        if i + 1 == len(ordered) or ordered[i + 1] != slot + 1:
            first = ordered[start]
            parts.append(str(first) if first == slot else f"{first}-{slot}")
            start = i + 1
    return ",".join(parts)


def handed_over(
    entries: Sequence[Mapping[str, object]], slots: Sequence[int], donor: str, receiver: str
) -> list[dict[str, object]]:
    """The cell map ``entries`` (as in ISSUANCE_CELLS) after ``slots`` went
    from ``donor`` to ``receiver``: every cell's slots written out."""
    current = build_map(entries)
    moving = set(slots)
    mine = {cell.name: set(cell.slots) for cell in current.cells}
    if not moving <= mine[current.by_name(donor).name]:
        raise CellMapError(f"cell {donor} does not serve slots {format_slots(sorted(moving - mine[donor]))}")
    mine[donor] -= moving
    mine[current.by_name(receiver).name] |= moving
    return [
        {**entry, "slots": format_slots(sorted(mine[cell.name]))}
        for entry, cell in zip(entries, current.cells, strict=True)
    ]


def even_slots(count: int) -> list[tuple[int, ...]]:
    """The ring cut into ``count`` contiguous, nearly equal ranges."""
    bounds = [RING_SLOTS * i // count for i in range(count + 1)]
    return [tuple(range(bounds[i], bounds[i + 1])) for i in range(count)]


def build_map(cells: Sequence[Mapping[str, object]]) -> CellMap:
    """A checked cell map: names and numbers unique, every ring slot served by
    exactly one cell. Slots may be left out of every entry (an even split in
    the listed order) but not out of some only."""
    if not cells:
        raise CellMapError("the cell map lists no cell")
    given = ["slots" in c for c in cells]
    if any(given) and not all(given):
        raise CellMapError("give slots for every cell or for none")
    defaults = even_slots(len(cells))
    built: list[Cell] = []
    for index, entry in enumerate(cells):
        built.append(_cell(entry, index, defaults[index]))
    _check_unique([c.name for c in built], "name")
    _check_unique([c.number for c in built], "number")
    ring: list[int | None] = [None] * RING_SLOTS
    for index, cell in enumerate(built):
        for slot in cell.slots:
            if ring[slot] is not None:
                raise CellMapError(f"slot {slot} is served by {built[ring[slot]].name} and {cell.name}")  # type: ignore[index]
            ring[slot] = index
    missing = [slot for slot, owner in enumerate(ring) if owner is None]
    if missing:
        raise CellMapError(f"{len(missing)} ring slots are served by no cell (first: {missing[0]})")
    return CellMap(tuple(built), tuple(owner for owner in ring if owner is not None))


def _cell(entry: Mapping[str, object], index: int, default_slots: tuple[int, ...]) -> Cell:
    name = str(entry.get("name") or "")
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise CellMapError(f"cell {index + 1} needs a name of letters, digits, - and _")
    missing = [key for key in ("database_url", "amqp_url") if not entry.get(key)]
    if missing:
        raise CellMapError(f"cell {name} has no {' or '.join(missing)}")
    number = entry.get("number", index)
    if not isinstance(number, int) or not 0 <= number < MAX_CELLS:
        raise CellMapError(f"cell {name}: number must be an integer 0-{MAX_CELLS - 1}")
    raw_slots = entry.get("slots")
    slots = parse_slots(str(raw_slots)) if raw_slots is not None else default_slots
    return Cell(
        name=name,
        number=number,
        database_url=str(entry["database_url"]),
        amqp_url=str(entry["amqp_url"]),
        redis_url=str(entry.get("redis_url") or ""),
        slots=slots,
    )


def _check_unique(values: Sequence[object], what: str) -> None:
    seen: set[object] = set()
    for value in values:
        if value in seen:
            raise CellMapError(f"two cells have the {what} {value!r}")
        seen.add(value)


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` shares that differ by at most one and sum to it."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def slot_ranges(shares: Sequence[int]) -> list[range]:
    """Disjoint package-slot numbers for each share: 0..a-1, a..a+b-1, ..."""
    ranges: list[range] = []
    start = 0
    for share in shares:
        ranges.append(range(start, start + share))
        start += share
    return ranges
