"""A worker of one cell refuses claims whose number routes to another cell:
the real actors in process on the test database, a two-cell map in which
this database is cell a. A producer with another map (or none) must not
split a member's packages over two cells."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import psycopg
import pytest
from issuance.shared.cellmap import load_cell_map
from issuance.shared.domain.cells import MEMBER_ID_SPAN, route_slot
from issuance.shared.errors import ConfigurationError
from issuance.shared.settings import Settings
from issuance.shared.wire.codec import envelope
from issuance.shared.wire.messages import (
    ClaimsRequested,
    MemberRegistered,
    Message,
    OrderPlaced,
    ShareOpened,
    utcnow,
)

from tests.conftest import claim, make_activity


def two_cell_map(settings: Settings) -> str:
    # Cell b is never contacted: its URLs only name it.
    return json.dumps(
        [
            {"name": "a", "number": 0, "database_url": settings.database_url, "amqp_url": settings.amqp_url},
            {
                "name": "b",
                "number": 1,
                "database_url": "postgresql://cell-b/x",
                "amqp_url": "amqp://cell-b/b",
            },
        ]
    )


@pytest.fixture
def cell_a(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """The actors in process (stub broker, follow-ups dropped) as cell a's worker."""
    monkeypatch.setenv("ISSUANCE_BROKER", "stub")
    from issuance.workers import runtime

    monkeypatch.setattr(runtime, "send", lambda actor, message: None)
    here = dataclasses.replace(settings, cells=two_cell_map(settings), cell="a")
    resources = runtime.Resources(here)
    monkeypatch.setattr(runtime, "_resources", resources)
    try:
        yield here
    finally:
        resources.close()


def phone_in(settings: Settings, cell: str, start: int) -> str:
    cells = load_cell_map(settings)
    n = start
    while cells.cell_for_phone(f"+86137{n:08d}").name != cell:
        n += 1
    return f"+86137{n:08d}"


def wire(message: Message) -> Any:
    """The payload as a worker receives it, through the codec's JSON."""
    return orjson.loads(orjson.dumps(envelope(message)))["args"][0]


def rows(settings: Settings, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(settings.database_url) as conn:
        return conn.execute(sql).fetchall()


def test_a_worker_dead_letters_claims_of_another_cell_and_decides_its_own(cell_a: Settings) -> None:
    from issuance.workers import actors

    slug = make_activity(cell_a, budget=10, codes=10)["slug"]
    own, other, other2 = phone_in(cell_a, "a", 0), phone_in(cell_a, "b", 0), phone_in(cell_a, "b", 10**6)
    stray = claim(slug, other)
    actors.claim_requested.fn(wire(stray))
    mine, stray2 = claim(slug, own), claim(slug, other2)
    batch = ClaimsRequested(batch_id=uuid.uuid4(), claims=(mine, stray2))
    actors.claims_requested.fn(wire(batch))
    # Re-delivered: still not decided, and dead-lettered once.
    actors.claims_requested.fn(wire(batch))

    # Before: every claim was decided here, cell b's numbers included.
    decided = {r[0] for r in rows(cell_a, "SELECT claim_id FROM claims")}
    assert decided == {mine.claim_id}
    letters = rows(cell_a, "SELECT reason, actor, detail FROM dead_letters ORDER BY dead_letter_id")
    assert [(reason, actor) for reason, actor, _ in letters] == [
        ("wrong_cell", "claim_requested"),
        ("wrong_cell", "claims_requested"),
    ]
    assert letters[0][2] == f"claim {stray.claim_id}: its number routes to cell b, this is cell a"
    # The number is not in the dead letter's text.
    assert other not in letters[0][2] and other2 not in letters[1][2]


def test_a_cell_name_the_map_does_not_know_stops_the_worker(settings: Settings) -> None:
    from issuance.workers import runtime

    with pytest.raises(ConfigurationError, match="ISSUANCE_CELL: no cell named 'c'; cells: a, b"):
        runtime.Resources(dataclasses.replace(settings, cells=two_cell_map(settings), cell="c"))
    with pytest.raises(ConfigurationError, match="ISSUANCE_CELL=a needs ISSUANCE_CELLS"):
        runtime.Resources(dataclasses.replace(settings, cell="a"))


def share_id_in(settings: Settings, cell: str) -> uuid.UUID:
    cells = load_cell_map(settings)
    while True:
        share = uuid.uuid4()
        if cells.cell_for_slot(route_slot(str(share))).name == cell:
            return share


def test_a_worker_dead_letters_member_messages_of_another_cell(cell_a: Settings, monkeypatch) -> None:
    """Orders, registrations and share opens route by their member (its ID
    carries its cell), a registration by number, an open by its share ID:
    a worker applies those of its own cell only."""
    from issuance.workers import actors, cell_referrals

    # The other cells of this map are not running: an order applied here
    # would announce its share to them (tests/e2e/test_cells_referrals.py).
    announced: list[str] = []
    monkeypatch.setattr(cell_referrals, "announce_share", lambda message: announced.append(message.order_id))

    now = utcnow()
    of_b, of_c = MEMBER_ID_SPAN + 7, 5 * MEMBER_ID_SPAN + 7
    strays: list[tuple[Any, Message]] = [
        (
            actors.order_placed,
            OrderPlaced(order_id="SO-B-1", member_id=of_b, amount_cents=900, placed_at=now),
        ),
        (
            actors.order_placed,
            OrderPlaced(order_id="SO-C-1", member_id=of_c, amount_cents=900, placed_at=now),
        ),
        (actors.member_registered, MemberRegistered(member_id=of_b, registered_at=now)),
        (actors.member_registered, MemberRegistered(phone=phone_in(cell_a, "b", 0), registered_at=now)),
        (
            actors.share_opened,
            ShareOpened(event_id=uuid.uuid4(), share_id=share_id_in(cell_a, "b"), opened_at=now),
        ),
    ]
    for actor, message in strays:
        actor.fn(wire(message))
    # Its own cell's order, by a member ID of cell a (number 0), is applied.
    actors.order_placed.fn(wire(OrderPlaced(order_id="SO-A-1", member_id=7, amount_cents=900, placed_at=now)))

    # Before: every one was applied here (orders, shares and opens of cell b's members).
    assert rows(cell_a, "SELECT order_id FROM orders") == [("SO-A-1",)]
    assert announced == ["SO-A-1"]
    assert rows(cell_a, "SELECT count(*) FROM share_opens") == [(0,)]
    letters = rows(cell_a, "SELECT reason, actor, detail FROM dead_letters ORDER BY dead_letter_id")
    assert [(reason, actor) for reason, actor, _ in letters] == [
        ("wrong_cell", "order_placed"),
        ("wrong_cell", "order_placed"),
        ("wrong_cell", "member_registered"),
        ("wrong_cell", "member_registered"),
        ("wrong_cell", "share_opened"),
    ]
    assert letters[0][2] == "order-placed SO-B-1: it routes to cell b, this is cell a"
    assert letters[1][2] == (
        f"order-placed SO-C-1: member {of_c} belongs to cell number 5, which is not in the cell map,"
        " this is cell a"
    )
    # The registration by number: neither its text nor its kept body shows the number.
    phone = phone_in(cell_a, "b", 0)
    assert phone not in letters[3][2]
    assert rows(cell_a, f"SELECT count(*) FROM dead_letters WHERE body LIKE '%{phone[4:]}%'") == [(0,)]
