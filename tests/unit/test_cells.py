"""Cells: the map, routing by member, and the routing publisher's cuts."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterable

import pytest
from issuance.shared.cellmap import cell_settings, load_cell_map
from issuance.shared.domain import normalize_phone, phone_digest
from issuance.shared.domain.cells import (
    MEMBER_ID_SPAN,
    RING_SLOTS,
    CellMapError,
    build_map,
    format_slots,
    handed_over,
    member_id_range,
    parse_slots,
    route_slot,
    slot_ranges,
    split_evenly,
)
from issuance.shared.errors import ConfigurationError
from issuance.shared.settings import Settings, settings_from
from issuance.shared.wire.cells import CellPublisher, CellRouter, RoutingError
from issuance.shared.wire.messages import (
    ClaimRequested,
    ClaimsRequested,
    MemberRegistered,
    Message,
    OrderPlaced,
    OrderStatusChanged,
    ShareOpened,
    utcnow,
)
from issuance.shared.wire.publisher import Publisher


def entries(count: int, **slots: str) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for n in range(count):
        entry: dict[str, object] = {
            "name": f"c{n}",
            "number": n,
            "database_url": f"postgresql://127.0.0.1/c{n}",
            "amqp_url": f"amqp://guest:guest@127.0.0.1/c{n}",
        }
        if f"c{n}" in slots:
            entry["slots"] = slots[f"c{n}"]
        out.append(entry)
    return out


PHONES = [f"+86139{n:08d}" for n in range(0, 40_000_000, 4001)]


def test_no_cell_map_is_one_implicit_cell_of_todays_settings() -> None:
    settings = Settings()
    cells = load_cell_map(settings)
    assert [c.name for c in cells.cells] == ["main"]
    assert cells.cells[0].database_url == settings.database_url
    assert {cells.cell_for_phone(p).name for p in PHONES[:200]} == {"main"}
    assert cell_settings(settings, cells.cells[0]) == settings


def test_cell_map_from_the_environment_inline_or_file(tmp_path: object) -> None:
    text = json.dumps(entries(3))
    inline = load_cell_map(settings_from({"ISSUANCE_CELLS": text}))
    path = tmp_path / "cells.json"  # type: ignore[operator]
    path.write_text(json.dumps({"cells": entries(3)}))
    from_file = load_cell_map(settings_from({"ISSUANCE_CELLS": str(path)}))
    assert inline == from_file
    assert [len(c.slots) for c in inline.cells] == [341, 341, 342]
    with pytest.raises(ConfigurationError, match="ISSUANCE_CELLS: cannot read"):
        load_cell_map(settings_from({"ISSUANCE_CELLS": str(tmp_path / "missing.json")}))  # type: ignore[operator]


@pytest.mark.parametrize(
    ("cells", "problem"),
    [
        (entries(2, c0="0-600", c1="500-1023"), "slot 500 is served by c0 and c1"),
        (entries(2, c0="0-500", c1="600-1023"), "99 ring slots are served by no cell"),
        (entries(2, c0="0-1023"), "give slots for every cell or for none"),
        ([*entries(2), {**entries(1)[0], "number": 5}], "two cells have the name"),
        ([{"name": "x", "database_url": "postgresql://h/x"}], "cell x has no amqp_url"),
        (entries(2, c0="0-511", c1="512-1024"), "outside 0-1023"),
    ],
)
def test_a_broken_cell_map_is_refused(cells: list[dict[str, object]], problem: str) -> None:
    with pytest.raises(CellMapError, match=problem):
        build_map(cells)


def test_adding_a_cell_moves_only_the_slots_it_is_given() -> None:
    """Three cells, then a fourth taking 100 named slots from the first:
    only numbers in those slots change cell; mod-N would move about 3/4."""
    before = build_map(entries(3, c0="0-340", c1="341-681", c2="682-1023"))
    after = build_map(entries(4, c0="100-340", c1="341-681", c2="682-1023", c3="0-99"))
    moved = [p for p in PHONES if before.cell_for_phone(p).name != after.cell_for_phone(p).name]
    assert moved, "some numbers live in the handed-over slots"
    assert all(after.cell_for_phone(p).name == "c3" for p in moved)
    assert all(route_slot(p) < 100 for p in moved)
    assert len(moved) < len(PHONES) * 0.15
    mod_n_moved = [p for p in PHONES if route_slot(p) % 3 != route_slot(p) % 4]
    assert len(mod_n_moved) > len(PHONES) * 0.5


def test_a_handover_writes_the_new_map_with_every_cells_slots() -> None:
    """A new cell enters the map with no slot; the handover's map gives it
    the donor's slots and leaves the rest as it was."""
    cells = entries(3, c0="0-511", c1="512-1023", c2="")
    assert build_map(cells).by_name("c2").slots == ()
    after = handed_over(cells, parse_slots("768-1023"), "c1", "c2")
    assert [e["slots"] for e in after] == ["0-511", "512-767", "768-1023"]
    assert [e["database_url"] for e in after] == [e["database_url"] for e in cells]
    assert build_map(after).cell_for_slot(800).name == "c2"
    with pytest.raises(CellMapError, match="cell c0 does not serve slots 600-601"):
        handed_over(cells, [600, 601], "c0", "c2")
    assert format_slots([5, 1, 2, 3, 9, 10]) == "1-3,5,9-10"
    assert parse_slots(format_slots([5, 1, 2, 3, 9, 10])) == (1, 2, 3, 5, 9, 10)


@pytest.mark.parametrize(
    ("state", "here", "verdict"),
    [
        # The receiver waits for the members, then decides.
        ("holding", "c", "hold"),
        ("done", "c", "decide"),
        # The donor decides until finish, waits while the members move, then
        # refuses (wrong_cell).
        ("leaving", "b", "decide"),
        ("holding", "b", "hold"),
        ("done", "b", "gone"),
    ],
)
def test_each_side_of_a_handover_decides_only_in_its_turn(state: str, here: str, verdict: str) -> None:
    from issuance.shared.db.cells import Handover

    assert Handover(800, "b", "c", state).verdict(here) == verdict


def test_routing_ignores_the_phone_key_and_spreads_evenly() -> None:
    """The route is a function of the number alone: rotating the key changes
    every digest and no route."""
    assert phone_digest(PHONES[0], "key-one-0123456789") != phone_digest(PHONES[0], "key-two-0123456789")
    cells = build_map(entries(3))
    counts: dict[str, int] = {}
    for phone in PHONES:
        counts[cells.cell_for_phone(phone).name] = counts.get(cells.cell_for_phone(phone).name, 0) + 1
    assert min(counts.values()) > len(PHONES) / 3 * 0.85, counts
    assert all(0 <= route_slot(p) < RING_SLOTS for p in PHONES)


def test_member_ids_carry_their_cell() -> None:
    cells = build_map(entries(3))
    for number in range(3):
        lo, hi = member_id_range(number)
        assert cells.cell_for_member(lo).number == number == cells.cell_for_member(hi).number
    assert member_id_range(0)[0] == 1
    with pytest.raises(CellMapError, match="cell number 7"):
        cells.cell_for_member(7 * MEMBER_ID_SPAN + 5)


def test_budget_shares_and_slot_ranges_are_disjoint_and_sum_to_the_budget() -> None:
    for total in (0, 1, 2, 3000, 3001):
        shares = split_evenly(total, 3)
        ranges = slot_ranges(shares)
        assert sum(shares) == total and max(shares) - min(shares) <= 1
        numbers = [n for r in ranges for n in r]
        assert sorted(numbers) == list(range(total))


class Recording(Publisher):
    def __init__(self) -> None:
        self.sent: list[Message] = []

    def publish_many(self, messages: Iterable[Message]) -> int:
        batch = list(messages)
        self.sent.extend(batch)
        return len(batch)


def claim(phone: str, claim_id: uuid.UUID | None = None) -> ClaimRequested:
    return ClaimRequested(claim_id=claim_id or uuid.uuid4(), activity="a", phone=phone, requested_at=utcnow())


def test_the_routing_publisher_sends_each_member_to_one_cell() -> None:
    cells = build_map(entries(3))
    router = CellRouter(cells, "CN")
    recorders = {name: Recording() for name in cells.names}
    publisher = CellPublisher(router, recorders)
    claims = [claim(p) for p in PHONES[:300]]
    # The same numbers typed another way, and re-sends with the same claim IDs.
    typed = [claim(p.replace("+86", "0086 "), c.claim_id) for p, c in zip(PHONES[:300], claims, strict=True)]
    publisher.publish_claims(claims, batch=50)
    publisher.publish_claims(typed, batch=50)
    home = {c.claim_id: cells.cell_for_phone(normalize_phone(c.phone, "CN")).name for c in claims}
    seen: dict[uuid.UUID, set[str]] = {}
    for name, recorder in recorders.items():
        for message in recorder.sent:
            assert isinstance(message, ClaimsRequested)
            for item in message.valid:
                seen.setdefault(item.claim_id, set()).add(name)
    assert {k: {v} for k, v in home.items()} == seen
    assert all(len(r.sent) >= 2 for r in recorders.values())


def test_a_claim_batch_is_cut_per_cell_the_same_way_every_time() -> None:
    cells = build_map(entries(3))
    router = CellRouter(cells, "CN")
    batch = ClaimsRequested(batch_id=uuid.uuid4(), claims=tuple(claim(p) for p in PHONES[:60]))
    first, again = router.split_batch(batch), router.split_batch(batch)
    assert first == again and len(first) == 3
    assert sorted(c.claim_id for part in first.values() for c in part.valid) == sorted(
        c.claim_id for c in batch.valid
    )
    assert len({part.batch_id for part in first.values()} | {batch.batch_id}) == 4


def test_orders_and_registrations_route_by_member() -> None:
    cells = build_map(entries(3))
    router = CellRouter(cells, "CN")
    now = utcnow()
    member = member_id_range(2)[0] + 41
    assert (
        router.cell_of(OrderPlaced(order_id="SO-1", member_id=member, amount_cents=1, placed_at=now)) == "c2"
    )
    assert router.cell_of(MemberRegistered(registered_at=now, member_id=member)) == "c2"
    by_phone = router.cell_of(MemberRegistered(registered_at=now, phone=PHONES[7]))
    assert by_phone == router.cell_of(claim(PHONES[7]))
    share = ShareOpened(event_id=uuid.uuid4(), share_id=uuid.uuid4(), opened_at=now)
    assert router.cell_of(share) == router.cell_of(dataclasses.replace(share, event_id=uuid.uuid4()))
    status = OrderStatusChanged(order_id="SO-1", status="paid", changed_at=now)
    with pytest.raises(RoutingError, match="publish_for_member"):
        router.cell_of(status)
    by_app_id = OrderPlaced(order_id="SO-2", app_member_id=77, amount_cents=1, placed_at=now)
    with pytest.raises(RoutingError, match="order-placed message names no member"):
        router.cell_of(by_app_id)
    recorders = {name: Recording() for name in cells.names}
    CellPublisher(router, recorders).publish_for_member(member, [status])
    assert recorders["c2"].sent == [status]


def test_the_page_and_publish_route_over_the_cells_only_when_a_map_is_set() -> None:
    from issuance.shared.wire.cells import publisher_for
    from issuance.shared.wire.publisher import RabbitPublisher

    plain = publisher_for(Settings())
    assert isinstance(plain, RabbitPublisher)
    routed = publisher_for(settings_from({"ISSUANCE_CELLS": json.dumps(entries(3))}), connect_attempts=2)
    assert isinstance(routed, CellPublisher)
    assert {name: p.url for name, p in routed.publishers.items()} == {  # type: ignore[attr-defined]
        f"c{n}": f"amqp://guest:guest@127.0.0.1/c{n}" for n in range(3)
    }
    assert all(p.connect_attempts == 2 for p in routed.publishers.values())  # type: ignore[attr-defined]


def test_cells_show_names_each_cell_without_passwords(capsys: pytest.CaptureFixture[str]) -> None:
    from issuance.shared.cli import build_parser

    settings = settings_from({"ISSUANCE_CELLS": json.dumps(entries(2, c0="0-99,200-1023", c1="100-199"))})
    args = build_parser().parse_args(["cells", "show"])
    assert args.func(args, settings) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "c0: number 0, ring slots 0-99,200-1023 (924), database postgresql://127.0.0.1/c0,"
        " broker amqp://guest:***@127.0.0.1/c0",
        "c1: number 1, ring slots 100-199 (100), database postgresql://127.0.0.1/c1,"
        " broker amqp://guest:***@127.0.0.1/c1",
    ]


def test_a_number_routes_the_same_however_it_is_typed_in_every_region() -> None:
    """E.164 text is routed as written (no parse); any other form is parsed
    first. Both must agree for every region's example mobile number."""
    import phonenumbers

    cells = build_map(entries(3))
    checked = 0
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        example = phonenumbers.example_number_for_type(region, phonenumbers.PhoneNumberType.MOBILE)
        if example is None:
            continue
        router = CellRouter(cells, region)
        e164 = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164)
        typed = [
            phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.NATIONAL),
            phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.INTERNATIONAL),
        ]
        assert normalize_phone(e164, region) == e164
        assert {router.phone_cell(t) for t in typed} == {router.phone_cell(e164)}, (region, typed)
        checked += 1
    assert checked > 200
