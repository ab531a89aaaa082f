"""The coupon at checkout against real PostgreSQL: a whole cart played
through the HTTP API (list, choose the best, reserve, pay, refund), release
and timeout, the validity window, strict requests, and two checkouts racing
for one code, many times, never both holding or redeeming it."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import jsonschema
import psycopg
import pytest
import uvicorn
from issuance.producers.checkout import service
from issuance.producers.checkout.app import create_app
from issuance.producers.checkout.openapi import SPEC
from issuance.shared.db import checkout_store, coupon_store
from issuance.shared.domain.checkout import Cart
from issuance.shared.domain.coupons import LifecycleRefusal
from issuance.shared.wire.messages import OrderPlaced, utcnow
from issuance.workers.lifecycle import record_order

from tests.conftest import verify_clean
from tests.integration.lifecycle_support import activity_with, member_with_package, move, one, prefix, rows


def conforms(body: Any, schema: str) -> Any:
    """``body``, after checking it against the API's own description."""
    jsonschema.validate(body, {"$ref": f"#/components/schemas/{schema}", "components": SPEC["components"]})
    return body


@pytest.fixture
def client(pool) -> Iterator[httpx.Client]:
    with serve(pool) as c:
        yield c


@contextlib.contextmanager
def serve(pool, clients: dict[str, str] | None = None) -> Iterator[httpx.Client]:
    """The checkout API under uvicorn in a thread, on a free local port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(pool=pool, clients=clients), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the checkout API did not start"
        time.sleep(0.01)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15) as c:
            yield c
    finally:
        server.should_exit = True
        thread.join(15)


def order_id() -> str:
    return f"SO-{secrets.token_hex(6)}"


def three_kinds(settings: Any, codes: int = 20) -> tuple[str, str, str, dict[str, Any]]:
    rate, off, gift = prefix(), prefix(), prefix()
    act = activity_with(
        settings,
        codes=codes,
        budget=codes,
        templates=[
            {"prefix": rate, "kind": "discount_rate", "value": 1000},  # 10% off
            {"prefix": off, "kind": "amount_off", "value": 500, "threshold_cents": 5000},
            {"prefix": gift, "kind": "gift", "value": 300},
        ],
    )
    return rate, off, gift, act


def cart_body(member: int, codes: list[str], amount: int = 20_000, items: int = 3) -> dict[str, Any]:
    return {"member_id": member, "amount_cents": amount, "items": items, "codes": codes}


def test_a_whole_cart_list_choose_reserve_pay_refund(settings, pool, client):
    rate, off, gift, act = three_kinds(settings)
    member, codes, _ = member_with_package(pool, settings, act["slug"])
    by_prefix = {p: next(c for c in codes if c.startswith(p)) for p in (rate, off, gift)}

    # List: every coupon applies to 200.00; 10% off saves most, then 5.00, then the 3.00 gift.
    listed = conforms(
        client.get(f"/api/members/{member}/coupons", params={"amount_cents": 20_000, "items": 3}).json(),
        "CouponList",
    )
    assert [(c["code"], c["discount_cents"]) for c in listed["coupons"]] == [
        (by_prefix[rate], 2000),
        (by_prefix[off], 500),
        (by_prefix[gift], 300),
    ]
    # Below the threshold, the amount-off coupon says why.
    small = client.get(f"/api/members/{member}/coupons", params={"amount_cents": 4000, "items": 1}).json()
    refused = {c["code"]: c for c in small["coupons"] if not c["applicable"]}
    assert refused[by_prefix[off]]["reason"] == "below_threshold"
    assert refused[by_prefix[off]]["message"] == LifecycleRefusal.BELOW_THRESHOLD.text

    # Choose the best, validate, reserve (twice: the same answer).
    best = listed["best"]
    assert best == by_prefix[rate]
    order = order_id()
    valid = client.post(f"/api/orders/{order}/validate", json=cart_body(member, [best]))
    assert (valid.status_code, conforms(valid.json(), "CheckoutAnswer")["outcome"]) == (200, "valid")
    first = client.post(f"/api/orders/{order}/reserve", json=cart_body(member, [best]))
    again = client.post(f"/api/orders/{order}/reserve", json=cart_body(member, [best]))
    assert first.status_code == again.status_code == 200
    assert conforms(first.json(), "CheckoutAnswer") == again.json()
    assert first.json()["outcome"] == "reserved" and first.json()["discount_cents"] == 2000
    assert one(settings, "SELECT status FROM codes WHERE code = %s", best) == "unused"

    # Held: another order cannot take it, nor can this order change its values.
    other = client.post(f"/api/orders/{order_id()}/reserve", json=cart_body(member, [best]))
    assert (other.status_code, other.json()["reason"]) == (409, "held_by_another_order")
    changed = client.post(f"/api/orders/{order}/reserve", json=cart_body(member, [best], amount=30_000))
    assert (changed.status_code, changed.json()["reason"]) == (409, "order_conflict")

    # Pay: the code becomes used with the order, the time and the discount; again, the same.
    paid = client.post(f"/api/orders/{order}/redeem")
    assert (paid.status_code, conforms(paid.json(), "CheckoutAnswer")["outcome"]) == (200, "redeemed")
    assert client.post(f"/api/orders/{order}/redeem").json() == paid.json()
    status, used_in, discount, used_at = one(
        settings, "SELECT status, order_id, discount_cents, used_at FROM codes WHERE code = %s", best
    )
    assert (status, used_in, discount) == ("used", order, 2000) and used_at is not None
    assert one(settings, "SELECT discount_cents FROM orders WHERE order_id = %s", order) == 2000
    released = client.post(f"/api/orders/{order}/release")
    assert (released.status_code, released.json()["reason"]) == (409, "order_already_paid")

    # The order system's asynchronous events for the same order agree with it.
    late_event = OrderPlaced(
        order_id=order, member_id=member, amount_cents=20_000, placed_at=utcnow(), redeemed_codes=(best,)
    )
    assert not record_order(pool, late_event).recorded
    assert rows(settings, "SELECT reason FROM lifecycle_refusals") == []
    assert move(pool, order, "paid").outcome == "ok"

    # Refund after payment: the coupon is not given back (DOMAIN: it is voided).
    assert move(pool, order, "refunded").outcome == "ok"
    assert one(settings, "SELECT status, order_id FROM codes WHERE code = %s", best) == ("voided", order)
    relisted = client.get(
        f"/api/members/{member}/coupons", params={"amount_cents": 20_000, "items": 3}
    ).json()
    assert {c["code"]: c["reason"] for c in relisted["coupons"]}[best] == "voided"
    verify_clean(settings)


def test_release_timeout_and_the_sweep(settings, pool):
    rate, _, _, act = three_kinds(settings)
    member, codes, _ = member_with_package(pool, settings, act["slug"])
    code = next(c for c in codes if c.startswith(rate))
    now = utcnow()
    cart = Cart(amount_cents=10_000, items=1, at=now)

    # Cancelled before payment: released, free for the next order; again, the same.
    cancelled = order_id()
    assert service.reserve(pool, cancelled, member_id=member, cart=cart, codes=[code]).outcome == "reserved"
    assert service.release(pool, cancelled, at=now).outcome == "released"
    assert service.release(pool, cancelled, at=now).outcome == "released"
    assert service.redeem(pool, cancelled, at=now).reason is LifecycleRefusal.ORDER_CLOSED

    # A hold that lapses: the sweep releases it, payment after it is refused.
    lapsed = order_id()
    hold = timedelta(minutes=15)
    reserved = service.reserve(pool, lapsed, member_id=member, cart=cart, codes=[code], hold=hold)
    assert reserved.outcome == "reserved"
    assert service.release_timed_out(pool, now=now + hold - timedelta(seconds=1)) == 0
    assert service.release_timed_out(pool, now=now + hold) == 1
    late = service.redeem(pool, lapsed, at=now + hold)
    assert (late.outcome, late.reason) == ("refused", LifecycleRefusal.RESERVATION_EXPIRED)
    # Payment after the hold lapsed but before any sweep: refused too.
    unswept = order_id()
    service.reserve(pool, unswept, member_id=member, cart=cart, codes=[code], hold=hold)
    assert service.redeem(pool, unswept, at=now + hold).reason is LifecycleRefusal.RESERVATION_EXPIRED
    assert one(settings, "SELECT status FROM codes WHERE code = %s", code) == "unused"

    states = rows(settings, "SELECT order_id, state, release_reason FROM checkout_reservations ORDER BY 1")
    assert sorted(states) == sorted(
        [
            (cancelled, "released", "order_cancelled"),
            (lapsed, "released", "timeout"),
            (unswept, "released", "timeout"),
        ]
    )
    verify_clean(settings)


def test_a_coupon_cannot_be_used_before_its_window_opens(settings, pool, client):
    now = utcnow()
    act = activity_with(
        settings,
        validity_days=None,
        valid_from=now + timedelta(days=15),
        valid_until=now + timedelta(days=30),
        templates=[{"prefix": prefix(), "kind": "gift", "value": 300}],
    )
    member, (code,), _ = member_with_package(pool, settings, act["slug"])
    listed = client.get(f"/api/members/{member}/coupons", params={"amount_cents": 1000, "items": 1}).json()
    assert [(c["code"], c["applicable"], c["reason"]) for c in listed["coupons"]] == [
        (code, False, "not_yet_valid")
    ]
    assert listed["best"] is None
    refused = client.post(f"/api/orders/{order_id()}/reserve", json=cart_body(member, [code], amount=1000))
    assert refused.status_code == 409
    assert refused.json()["refused"] == [
        {"code": code, "reason": "not_yet_valid", "message": LifecycleRefusal.NOT_YET_VALID.text}
    ]
    # Refused means nothing kept: no order, no reservation.
    assert one(settings, "SELECT count(*) FROM orders") == 0
    assert one(settings, "SELECT count(*) FROM checkout_reservations") == 0


@pytest.mark.parametrize(
    ("path", "kwargs", "status"),
    [
        ("/api/members/1/coupons?amount_cents=-1&items=1", {}, 422),
        ("/api/members/1/coupons?amount_cents=1.5&items=1", {}, 422),
        ("/api/members/1/coupons?amount_cents=100", {}, 422),
        ("/api/members/1/coupons?amount_cents=100&items=1&at=2020-01-01", {}, 422),
        ("/api/members/x/coupons?amount_cents=100&items=1", {}, 422),
        ("/api/orders/SO-1/reserve", {"json": {"member_id": 1, "amount_cents": 1, "items": 1}}, 422),
        ("/api/orders/SO-1/reserve", {"json": {**cart_body(1, ["A"]), "extra": 1}}, 422),
        ("/api/orders/SO-1/reserve", {"json": cart_body(1, ["A"], amount=True)}, 422),
        ("/api/orders/SO-1/reserve", {"json": cart_body(1, ["A", "A"])}, 422),
        ("/api/orders/SO-1/reserve", {"json": cart_body(1, [])}, 422),
        ("/api/orders/SO-1/reserve", {"json": cart_body(1, ["not a code!"])}, 422),
        ("/api/orders/SO-1/reserve", {"json": [1, 2]}, 422),
        ("/api/orders/SO-1/reserve", {"content": b"{", "headers": {"content-type": "application/json"}}, 422),
        ("/api/orders/SO-1/reserve", {"content": b"{}", "headers": {"content-type": "text/plain"}}, 415),
        ("/api/orders/SO-1/reserve", {"content": b" " * 20_000}, 413),
        ("/api/orders/bad%20id/reserve", {"json": cart_body(1, ["A"])}, 422),
        ("/api/orders/SO-1/redeem", {"json": {"at": "2020-01-01T00:00:00Z"}}, 422),
        ("/api/orders/SO-404/redeem", {}, 404),
    ],
)
def test_requests_are_parsed_strictly(client, path, kwargs, status):
    response = client.get(path) if "/coupons" in path else client.post(path, **kwargs)
    assert response.status_code == status, response.text
    assert conforms(response.json(), "Error" if status != 404 else "CheckoutAnswer")


def test_the_openapi_describes_every_route(client):
    spec = client.get("/api/openapi.json").json()
    assert spec == SPEC
    routes = {getattr(route, "path", "") for route in create_app().routes} - {"/api/openapi.json"}
    assert set(spec["paths"]) == routes
    reasons = set(spec["components"]["schemas"]["CheckoutAnswer"]["properties"]["reason"]["enum"])
    assert {r.value for r in LifecycleRefusal} <= reasons


def test_the_database_holds_a_code_in_one_live_order_whatever_the_code_above(settings, pool):
    _, _, gift, act = three_kinds(settings)
    member, codes, _ = member_with_package(pool, settings, act["slug"])
    code = next(c for c in codes if c.startswith(gift))
    now = utcnow()
    first, second = order_id(), order_id()
    with psycopg.connect(settings.database_url) as conn:
        for order in (first, second):
            conn.execute(
                "INSERT INTO orders (order_id, member_id, amount_cents, placed_at) VALUES (%s, %s, 1, %s)",
                (order, member, now),
            )
        values: dict[str, Any] = {
            "member_id": member,
            "amount_cents": 1,
            "items": 1,
            "discount_cents": 1,
            "at": now,
        }
        hold = now + timedelta(minutes=5)
        assert checkout_store.insert_reservation(conn, order_id=first, code=code, hold_until=hold, **values)
        assert not checkout_store.insert_reservation(
            conn, order_id=second, code=code, hold_until=hold, **values
        )
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(
                "INSERT INTO checkout_reservations (order_id, code, member_id, amount_cents, items,"
                " discount_cents, hold_until) VALUES (%s, %s, %s, 1, 1, 1, %s)",
                (second, code, member, hold),
            )


ROUNDS = 30


def test_two_checkouts_racing_for_one_code_never_both_win(settings, pool):
    """Two orders for the same code, started together on two threads, reserve
    then pay; many rounds. Exactly one order holds and redeems the code; the
    other is refused with the reason; the code is used once."""
    _, _, gift, act = three_kinds(settings, codes=ROUNDS)
    winners: list[str] = []
    for _ in range(ROUNDS):
        member, codes, _ = member_with_package(pool, settings, act["slug"])
        code = next(c for c in codes if c.startswith(gift))
        orders = [order_id(), order_id()]
        answers: dict[str, list[service.CheckoutAnswer]] = {}
        start = threading.Barrier(2)

        def checkout(
            order: str,
            member: int = member,
            code: str = code,
            start: threading.Barrier = start,
            answers: dict[str, list[service.CheckoutAnswer]] = answers,
        ) -> None:
            cart = Cart(amount_cents=10_000, items=1, at=utcnow())
            start.wait()
            held = service.reserve(pool, order, member_id=member, cart=cart, codes=[code])
            paid = service.redeem(pool, order, at=utcnow())
            answers[order] = [held, paid]

        threads = [threading.Thread(target=checkout, args=(o,)) for o in orders]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        won = [o for o in orders if answers[o][1].outcome == "redeemed"]
        assert len(won) == 1, answers
        lost = next(o for o in orders if o not in won)
        # Held by the winner's reservation, or already used by its payment.
        held_or_used = (LifecycleRefusal.HELD_BY_ANOTHER_ORDER, LifecycleRefusal.ALREADY_USED)
        assert answers[lost][0].reason in held_or_used
        assert answers[lost][1].reason is LifecycleRefusal.UNKNOWN_ORDER
        assert one(settings, "SELECT status, order_id FROM codes WHERE code = %s", code) == ("used", won[0])
        winners.append(won[0])
    live = rows(
        settings,
        "SELECT code, count(*) FROM checkout_reservations WHERE state IN ('reserved', 'redeemed')"
        " GROUP BY code HAVING count(*) > 1",
    )
    assert live == []
    assert one(settings, "SELECT count(*) FROM checkout_reservations WHERE state = 'redeemed'") == ROUNDS
    verify_clean(settings)


def test_the_same_order_asked_twice_at_once_reserves_once(settings, pool):
    _, _, gift, act = three_kinds(settings)
    for _ in range(10):
        member, codes, _ = member_with_package(pool, settings, act["slug"])
        code = next(c for c in codes if c.startswith(gift))
        order = order_id()
        start = threading.Barrier(2)
        answers: list[service.CheckoutAnswer] = []

        def ask(
            member: int = member,
            code: str = code,
            order: str = order,
            start: threading.Barrier = start,
            answers: list[service.CheckoutAnswer] = answers,
        ) -> None:
            start.wait()
            cart = Cart(amount_cents=10_000, items=1, at=utcnow())
            answers.append(service.reserve(pool, order, member_id=member, cart=cart, codes=[code]))

        threads = [threading.Thread(target=ask) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert [a.outcome for a in answers] == ["reserved", "reserved"]
        assert answers[0].lines == answers[1].lines
        assert one(settings, "SELECT count(*) FROM checkout_reservations WHERE order_id = %s", order) == 1


def test_a_held_code_lost_before_payment_ends_the_hold_and_the_event_path_agrees(settings, pool):
    rate, _, gift, act = three_kinds(settings)
    member, codes, _ = member_with_package(pool, settings, act["slug"])
    by_prefix = {p: next(c for c in codes if c.startswith(p)) for p in (rate, gift)}
    now = utcnow()
    cart = Cart(amount_cents=10_000, items=1, at=now)

    # An operator cancels a held code: payment is refused with the reason, the hold ends.
    cancelled = order_id()
    service.reserve(pool, cancelled, member_id=member, cart=cart, codes=[by_prefix[gift]])
    with psycopg.connect(settings.database_url) as conn:
        coupon_store.cancel_code(conn, by_prefix[gift], now)
    refused = service.redeem(pool, cancelled, at=now)
    assert (refused.outcome, refused.reason) == ("refused", LifecycleRefusal.CANCELLED)
    ended = one(settings, "SELECT state, release_reason FROM checkout_reservations")
    assert ended == ("released", "cancelled")
    assert service.redeem(pool, cancelled, at=now) == refused  # asked again: the same answer

    # The order-placed event came first and used the code: checkout pays it once, not twice.
    order, code = order_id(), by_prefix[rate]
    event = OrderPlaced(
        order_id=order, member_id=member, amount_cents=10_000, placed_at=now, redeemed_codes=(code,)
    )
    assert record_order(pool, event).used == (code,)
    held = service.reserve(pool, order, member_id=member, cart=cart, codes=[code])
    assert (held.outcome, held.discount_cents) == ("reserved", 1000)
    assert service.redeem(pool, order, at=now).outcome == "redeemed"
    assert one(settings, "SELECT status, order_id FROM codes WHERE code = %s", code) == ("used", order)
    verify_clean(settings)


def test_the_command_serves_the_api(service_env, settings):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "issuance.shared.cli", "checkout", "serve", "--port", str(port)]
    token = "orders-" + "t" * 32
    env = {**os.environ, **service_env, "ISSUANCE_CHECKOUT_TOKENS": f"orders:{token}"}
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                spec = httpx.get(f"http://127.0.0.1:{port}/api/openapi.json", timeout=2).json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "issuance checkout serve did not answer"
                time.sleep(0.1)
        assert spec["info"]["title"] == SPEC["info"]["title"]
        url = f"http://127.0.0.1:{port}/api/members/1/coupons?amount_cents=100&items=1"
        assert httpx.get(url).status_code == 401
        listed = httpx.get(url, headers={"Authorization": f"Bearer {token}"}).json()
        assert listed == {"member_id": 1, "amount_cents": 100, "items": 1, "best": None, "coupons": []}
    finally:
        proc.terminate()
        proc.wait(15)


ORDERS_TOKEN, PARTNER_TOKEN = "o" * 32, "p" * 32


def test_with_tokens_set_every_operation_needs_a_bearer_token(pool):
    with serve(pool, clients={ORDERS_TOKEN: "orders", PARTNER_TOKEN: "acme"}) as c:
        url = "/api/members/1/coupons?amount_cents=100&items=1"
        bare = c.get(url)
        assert (bare.status_code, bare.headers["www-authenticate"]) == (401, "Bearer")
        assert c.get(url, headers={"Authorization": "Bearer " + "x" * 32}).status_code == 401
        assert c.get(url, headers={"Authorization": f"Basic {ORDERS_TOKEN}"}).status_code == 401
        assert c.get(url, headers={"Authorization": f"Bearer {ORDERS_TOKEN}"}).status_code == 200
        assert c.post(f"/api/orders/{order_id()}/redeem").status_code == 401
        # The specification stays readable without a token.
        assert c.get("/api/openapi.json").status_code == 200
        # A partner writes off codes in its own name only.
        body = {"partner": "acme", "reason": "printed voucher 7"}
        other = c.post(
            "/api/codes/ABCDEFGH/write-off", json=body, headers={"Authorization": f"Bearer {ORDERS_TOKEN}"}
        )
        assert (other.status_code, other.json()["error"]) == (
            403,
            "a write-off is made in the caller's own name (orders)",
        )


@pytest.mark.parametrize(
    ("env", "args", "says"),
    [
        ({}, [], "ISSUANCE_CHECKOUT_TOKENS is empty"),
        ({}, ["--no-auth", "--host", "0.0.0.0"], "--no-auth serves a loopback address only"),  # nosec B104
        ({"ISSUANCE_CHECKOUT_TOKENS": "orders:short"}, [], "entry 1 (orders): the token is shorter"),
        ({"ISSUANCE_CHECKOUT_TOKENS": "secretwithoutname" * 3}, [], "entry 1 is not name:token"),
    ],
)
def test_the_command_refuses_to_serve_without_a_usable_token(service_env, env, args, says):
    command = [sys.executable, "-m", "issuance.shared.cli", "checkout", "serve", "--port", "1", *args]
    done = subprocess.run(
        command,
        check=False,
        env={**os.environ, **service_env, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert says in done.stderr and "Traceback" not in done.stderr
    assert "secretwithoutname" not in done.stderr
