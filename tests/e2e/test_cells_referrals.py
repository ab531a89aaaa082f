"""Referrals and rebates across two cells, on the real services with real
workers per cell (issuance.workers.cell_referrals).

A referrer of cell a buys and pays; the share of the order is announced to
cell b. Its link is opened several times; the share's ID routes the opens to
cell b, which forwards them to the referrer's cell. Three friends claim
through the share, two of them numbers of cell b, one of cell a, and each
pays a first order: every K = 3 referrals earn the referrer a rebate, so the
one rebate needs both cells' referrals. A paid status is sent twice; one of
cell b's friends is refunded and the referrer's rebate is taken back in cell
a. Every cell's verify and the verify across cells stay clean.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from issuance.shared.cellmap import load_cell_map
from issuance.shared.cli import build_parser
from issuance.shared.domain import share_id_for
from issuance.shared.domain.cells import route_slot
from issuance.shared.settings import PREFIX, Settings, settings_from
from issuance.shared.wire.messages import OrderPlaced, OrderStatusChanged, ShareOpened, utcnow

from tests.conftest import cell_map, claim, private_services
from tests.e2e.conftest import Workers, consumers, wait_for

CELLS = "ab"
ACTIVITY = """
slug: {slug}
title: Refer three across cells
channel: cells-referrals
starts_at: 2020-01-01T00:00:00+00:00
ends_at: 2099-01-01T00:00:00+00:00
budget: 10
validity_days: 7
rebate_every: 3
rebate_amount_cents: 800
templates:
  - {{prefix: CRA, kind: amount_off, value: 500}}
"""
OPENS = 5


@pytest.fixture(scope="module")
def two_cells() -> Iterator[list[dict[str, str]]]:
    with private_services() as a, private_services() as b:
        yield [a, b]


def issuance(settings: Settings, *argv: str) -> tuple[int, str]:
    args = build_parser().parse_args(list(argv))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = int(args.func(args, settings))
    return status, out.getvalue()


def rows(url: str, sql: str, *params: Any) -> list[Any]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


def one(url: str, sql: str, *params: Any) -> Any:
    found = rows(url, sql, *params)
    return found[0][0] if found else None


def test_referrals_and_rebates_reach_the_referrers_cell(
    two_cells: list[dict[str, str]], tmp_path: Path
) -> None:
    envs = two_cells
    a, b = (env[f"{PREFIX}DATABASE_URL"] for env in envs)
    operator = settings_from({**envs[0], f"{PREFIX}CELLS": cell_map(envs)})
    slug = f"cr-{uuid.uuid4().hex[:6]}"
    assert issuance(operator, "cells", "init")[0] == 0
    assert issuance(operator, "cells", "each", "--", "channel", "create", "cells-referrals")[0] == 0
    spec = tmp_path / "activity.yaml"
    spec.write_text(ACTIVITY.format(slug=slug))
    assert issuance(operator, "cells", "each", "--", "activity", "create", "--file", str(spec))[0] == 0
    assert issuance(operator, "cells", "split", slug, "--budget", "10", "--codes", "CRA=10")[0] == 0

    log = tmp_path / "workers.log"
    workers = []
    try:
        for name, env in zip(CELLS, envs, strict=True):
            cell = {f"{PREFIX}CELLS": cell_map(envs), f"{PREFIX}CELL": name}
            worker_env = {**os.environ, **env, **cell, "ISSUANCE_TEST_LOG": str(log)}
            worker_env.pop("PYTEST_CURRENT_TEST", None)
            workers.append(Workers(worker_env, 1, 4, None))
        for env in envs:
            wait_for(lambda env=env: consumers(settings_from(env), "orders") >= 1, 90, "workers to consume")
        try:
            members = refer_across_cells(operator, a, b, slug)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{log.read_text()[-4000:]}") from None
    finally:
        for worker in workers:
            worker.stop()

    # Settled at once: nothing is in flight any more.
    settled = dataclasses.replace(operator, reconcile_grace_seconds=0)
    status, out = issuance(settled, "verify")
    assert status == 0, out
    assert "verify across cells: clean" in out
    lost_in_transit(settled, a, members)


def lost_in_transit(operator: Settings, a: str, members: list[int]) -> None:
    """What the verify across cells sees that neither cell can: a referral
    that never reached its referrer's cell, and one that was never counted."""
    with psycopg.connect(a) as conn:
        conn.execute("DELETE FROM cell_referrals WHERE referee_member_id = %s", (members[0],))
        conn.execute(
            "UPDATE cell_referrals SET referee_member_id = %s WHERE referee_member_id = %s",
            (members[1] + 1000, members[1]),
        )
    status, out = issuance(operator, "verify", "--json")
    report = json.loads(out)
    assert status == 1
    examples = report["examples"]
    assert sorted(examples["referral_not_in_referrers_cell"]) == sorted(
        [[str(members[0]), "b", "a"], [str(members[1]), "b", "a"]]
    )
    assert examples["crossed_referral_without_referral"] == [[str(members[1] + 1000), "a", "b"]]


def phones_of(operator: Settings) -> dict[str, list[str]]:
    cells = load_cell_map(operator)
    found: dict[str, list[str]] = {name: [] for name in CELLS}
    n = 0
    while min(len(v) for v in found.values()) < 3:
        phone = f"+86135{uuid.uuid4().int % 10**8:08d}"
        found[cells.cell_for_phone(phone).name].append(phone)
        n += 1
    return found


def order_routed_to(operator: Settings, cell: str) -> str:
    """An order ID whose share's ID routes opens to ``cell``."""
    cells = load_cell_map(operator)
    while True:
        order_id = f"SO-R-{uuid.uuid4().hex[:10]}"
        if cells.cell_for_slot(route_slot(str(share_id_for(order_id)))).name == cell:
            return order_id


def refer_across_cells(operator: Settings, a: str, b: str, slug: str) -> list[int]:
    from issuance.shared.wire.cells import CellPublisher, publisher_for

    phones = phones_of(operator)
    referrer_phone = phones["a"][0]
    # Two friends of cell b, one of cell a.
    friends = [phones["b"][0], phones["b"][1], phones["a"][1]]
    publisher = publisher_for(operator)
    assert isinstance(publisher, CellPublisher)
    with publisher:
        first = claim(slug, referrer_phone)
        publisher.publish_claims([first])
        referrer = wait_for(
            lambda: one(
                a, "SELECT member_id FROM claims WHERE claim_id = %s AND status = 'credited'", first.claim_id
            ),
            60,
            "the referrer's claim",
        )
        # The referrer buys; the order and its share are the referrer's cell's.
        order_id = order_routed_to(operator, "b")
        share = share_id_for(order_id)
        now = utcnow()
        publisher.publish(
            OrderPlaced(
                order_id=order_id, member_id=referrer, amount_cents=20_000, placed_at=now, activity=slug
            )
        )
        publisher.publish_for_member(referrer, [paid(order_id)])
        # Cell b knows the share (without its activity), so its claims through it know the referrer.
        wait_for(
            lambda: one(b, "SELECT referrer_member_id FROM shares WHERE share_id = %s", share),
            60,
            "the share in b",
        )
        assert rows(b, "SELECT activity_id FROM shares WHERE share_id = %s", share) == [(None,)]
        assert rows(
            a, "SELECT s.referrer_member_id, a.slug FROM shares s JOIN activities a USING (activity_id)"
        ) == [(referrer, slug)]

        # The link is opened: its ID routes to cell b, which forwards the opens to cell a.
        opens = [ShareOpened(event_id=uuid.uuid4(), share_id=share, opened_at=utcnow()) for _ in range(OPENS)]
        publisher.publish_many(opens)
        publisher.publish_many(opens[:2])  # re-sent: counted once
        wait_for(lambda: one(a, "SELECT count(*) FROM share_opens") == OPENS, 60, "the opens in cell a")
        assert one(b, "SELECT count(*) FROM share_opens") == 0

        # Three friends claim through the share, each in their own cell.
        through = [claim(slug, phone, share_id=share) for phone in friends]
        publisher.publish_claims(through)
        members = []
        for friend, url in zip(through, (b, b, a), strict=True):
            members.append(
                wait_for(
                    lambda friend=friend, url=url: one(
                        url,
                        "SELECT member_id FROM claims WHERE claim_id = %s AND status = 'credited'",
                        friend.claim_id,
                    ),
                    60,
                    "a friend's claim",
                )
            )
        # Each pays a first order; one paid status is sent twice.
        orders = [f"SO-F-{uuid.uuid4().hex[:10]}" for _ in members]
        later = utcnow() + timedelta(seconds=1)
        for member, friend_order in zip(members, orders, strict=True):
            placed = OrderPlaced(order_id=friend_order, member_id=member, amount_cents=5_000, placed_at=later)
            publisher.publish(placed)
            publisher.publish_for_member(member, [paid(friend_order)])
        publisher.publish_for_member(members[0], [paid(orders[0])])

        # Each referral in the referee's cell; cell b's two in cell a too.
        # Before: cell b knew no share, counted no referral, and cell a's one
        # referral earned nothing.
        wait_for(lambda: one(a, "SELECT count(*) FROM rebates") == 1, 90, "the referrer's rebate")
        assert sorted(r[0] for r in rows(b, "SELECT referee_member_id FROM referrals")) == sorted(members[:2])
        assert [r[0] for r in rows(a, "SELECT referee_member_id FROM referrals")] == [members[2]]
        crossed = rows(
            a, "SELECT referee_member_id, referrer_member_id, order_id FROM cell_referrals ORDER BY 1"
        )
        assert crossed == sorted([(members[0], referrer, orders[0]), (members[1], referrer, orders[1])])
        rebate = rows(
            a, "SELECT referrer_member_id, rebate_no, amount_cents, credited_at IS NOT NULL FROM rebates"
        )
        assert rebate == [(referrer, 1, 800, True)]
        assert one(b, "SELECT count(*) FROM rebates") == 0

        # One of cell b's friends is refunded: the referral is reversed there,
        # then in cell a, where the rebate is no longer earned.
        publisher.publish_for_member(members[1], [refunded(orders[1])])
        wait_for(
            lambda: (
                one(a, "SELECT reversal FROM rebates WHERE referrer_member_id = %s", referrer) == "review"
            ),
            60,
            "the rebate taken back",
        )
        assert one(
            b, "SELECT reversed_at IS NOT NULL FROM referrals WHERE referee_member_id = %s", members[1]
        )
        assert one(
            a, "SELECT reversed_at IS NOT NULL FROM cell_referrals WHERE referee_member_id = %s", members[1]
        )
    # Nothing dead-lettered in either cell.
    assert [one(url, "SELECT count(*) FROM dead_letters") for url in (a, b)] == [0, 0]
    return members


def paid(order_id: str) -> OrderStatusChanged:
    return OrderStatusChanged(order_id=order_id, status="paid", changed_at=utcnow())


def refunded(order_id: str) -> OrderStatusChanged:
    return OrderStatusChanged(order_id=order_id, status="refunded", changed_at=utcnow())
