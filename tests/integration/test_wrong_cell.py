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


def handover(settings: Settings, slot: int, from_cell: str, to_cell: str, state: str) -> None:
    from issuance.shared.db import cells as db

    with psycopg.connect(settings.database_url, autocommit=True) as conn, conn.transaction():
        here = "a"
        if not db.handovers(conn, [slot]):
            db.begin_handover(conn, [slot], donor=from_cell, receiver=to_cell, here=here)
        db.set_handover_state(conn, [slot], state, donor=from_cell, receiver=to_cell)


def test_a_handed_slot_is_decided_by_one_cell_at_a_time(cell_a: Settings) -> None:
    """Cell a gives one number's ring slot to b: it decides it while
    leaving, holds it (retried) while the members move, then dead-letters it;
    as a receiver it holds a number of b's, then decides it although its
    map still names b."""
    from issuance.shared.domain.cells import route_slot
    from issuance.workers import actors

    slug = make_activity(cell_a, budget=10, codes=10)["slug"]
    own, theirs = phone_in(cell_a, "a", 0), phone_in(cell_a, "b", 0)
    handover(cell_a, route_slot(own), "a", "b", "leaving")
    first = claim(slug, own)
    actors.claim_requested.fn(wire(first))
    handover(cell_a, route_slot(own), "a", "b", "holding")
    again = claim(slug, own)
    with pytest.raises(actors.HandoverPending, match=f"ring slot {route_slot(own)} is being handed"):
        actors.claim_requested.fn(wire(again))
    handover(cell_a, route_slot(own), "a", "b", "done")
    actors.claims_requested.fn(wire(ClaimsRequested(batch_id=uuid.uuid4(), claims=(again,))))

    handover(cell_a, route_slot(theirs), "b", "a", "holding")
    incoming = claim(slug, theirs)
    with pytest.raises(actors.HandoverPending):
        actors.claim_requested.fn(wire(incoming))
    handover(cell_a, route_slot(theirs), "b", "a", "done")
    actors.claim_requested.fn(wire(incoming))

    decided = {r[0] for r in rows(cell_a, "SELECT claim_id FROM claims")}
    assert decided == {first.claim_id, incoming.claim_id}
    letters = rows(cell_a, "SELECT reason, detail FROM dead_letters")
    assert letters == [("wrong_cell", f"claim {again.claim_id}: its number routes to cell b, this is cell a")]
    # A donor whose workers run the new map already (b's slot, by the map)
    # still decides the slot while leaving, then refuses it.
    newer = phone_in(cell_a, "b", 10**6)
    handover(cell_a, route_slot(newer), "a", "b", "leaving")
    kept = claim(slug, newer)
    actors.claim_requested.fn(wire(kept))
    handover(cell_a, route_slot(newer), "a", "b", "done")
    late = claim(slug, newer)
    actors.claim_requested.fn(wire(late))
    decided.add(kept.claim_id)
    assert {r[0] for r in rows(cell_a, "SELECT claim_id FROM claims")} == decided
    assert rows(cell_a, f"SELECT reason FROM dead_letters WHERE detail LIKE '%{late.claim_id}%'") == [
        ("wrong_cell",)
    ]
    # A handover done cannot begin again (the donor would decide again).
    from issuance.shared.db import cells as db

    with (
        psycopg.connect(cell_a.database_url) as conn,
        pytest.raises(db.CellError, match="handed from a to b already"),
    ):
        db.begin_handover(conn, [route_slot(own)], donor="a", receiver="b", here="a")
    # Each member's ring slot is recorded as it claims.
    slots = {r[0] for r in rows(cell_a, "SELECT ring_slot FROM members")}
    assert slots == {route_slot(own), route_slot(theirs), route_slot(newer)}


def test_a_change_of_handover_state_waits_for_the_decisions_in_flight(cell_a: Settings) -> None:
    """The donor stops deciding a slot only once every transaction that
    read the slot's state as "decide" has committed."""
    import threading

    from issuance.shared.db import cells as db

    handover(cell_a, 7, "a", "b", "leaving")
    with psycopg.connect(cell_a.database_url) as deciding:
        assert db.slot_verdicts(deciding, "a", [7]) == {}  # decide: the SHARE lock is held
        changed = threading.Event()
        change = threading.Thread(target=lambda: (handover(cell_a, 7, "a", "b", "holding"), changed.set()))
        change.start()
        assert not changed.wait(1.0), "the state changed under a decision in flight"
        deciding.commit()
        assert changed.wait(10.0)
        change.join()
        assert db.slot_verdicts(deciding, "a", [7]) == {7: db.Verdict.HOLD}


def test_a_moved_members_holdings_refuse_a_second_package(cell_a: Settings) -> None:
    """A member moved in from cell b holds here what it held there: by
    exclusivity group, and by activity (slug: activity IDs differ by cell)."""
    from issuance.workers import actors

    start = make_activity(cell_a, budget=10, codes=10)["slug"]
    twin = make_activity(cell_a, budget=10, codes=10, group="twins")["slug"]
    held = make_activity(cell_a, budget=10, codes=10)["slug"]
    phone = phone_in(cell_a, "a", 0)
    actors.claim_requested.fn(wire(claim(start, phone)))
    ((member_id,),) = rows(cell_a, "SELECT member_id FROM members")
    with psycopg.connect(cell_a.database_url) as conn:
        conn.execute(
            "INSERT INTO member_holdings VALUES (%s, 'elsewhere', 'twins', 'b'), (%s, %s, 'g', 'b')",
            (member_id, member_id, held),
        )
    actors.claim_requested.fn(wire(claim(twin, phone)))
    actors.claim_requested.fn(wire(claim(held, phone)))
    statuses = rows(cell_a, "SELECT activity_slug, status FROM claims")
    assert sorted(statuses) == sorted([(start, "credited"), (twin, "refused"), (held, "refused")])


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
