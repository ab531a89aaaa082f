"""Redemptions without an order and shared promo codes against real
PostgreSQL: a promo code played through the HTTP API (validate, reserve,
pay, refund), its cap and per-member limit under racing checkouts, and gift
coupons and partner or printed codes written off with an audit record."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from issuance.producers.checkout import service
from issuance.shared.backoffice import promos
from issuance.shared.backoffice.catalog import BackOfficeError
from issuance.shared.db.promo_store import PromoSpec
from issuance.shared.domain.checkout import Cart
from issuance.shared.domain.coupons import LifecycleRefusal
from issuance.shared.wire.messages import utcnow

from tests.conftest import verify_clean
from tests.integration.lifecycle_support import member_with_package, move, one, rows
from tests.integration.test_checkout import cart_body, client, conforms, order_id, three_kinds

__all__ = ["client"]  # the fixture, shared with the checkout tests


def promo(settings: Any, template: str, code: str, **limits: Any) -> str:
    spec = PromoSpec(code=code, template=template, max_uses=limits.pop("max_uses", 100), **limits)
    with psycopg.connect(settings.database_url) as conn:
        promos.create_promo(conn, spec)
    return code


def uses(settings: Any, code: str) -> int:
    return int(one(settings, "SELECT uses FROM promo_codes WHERE code = %s", code))


def test_a_promo_code_through_the_http_api(settings, pool, client):
    rate, _, _, act = three_kinds(settings)
    code = promo(settings, rate, "SPRING50", max_uses=5, per_member_limit=1)
    member, _, _ = member_with_package(pool, settings, act["slug"])

    order = order_id()
    valid = client.post(f"/api/orders/{order}/validate", json=cart_body(member, [code]))
    assert (valid.status_code, conforms(valid.json(), "CheckoutAnswer")["discount_cents"]) == (200, 2000)
    assert uses(settings, code) == 0  # validation holds nothing
    first = client.post(f"/api/orders/{order}/reserve", json=cart_body(member, [code]))
    again = client.post(f"/api/orders/{order}/reserve", json=cart_body(member, [code]))
    assert first.status_code == again.status_code == 200 and first.json() == again.json()
    assert conforms(first.json(), "CheckoutAnswer")["outcome"] == "reserved"
    assert uses(settings, code) == 1  # one use, however often the order asks

    # The per-member limit: another order of the same member is refused.
    other = client.post(f"/api/orders/{order_id()}/reserve", json=cart_body(member, [code]))
    assert (other.status_code, other.json()["reason"]) == (409, "per_person_limit")

    paid = client.post(f"/api/orders/{order}/redeem")
    assert (paid.status_code, paid.json()["outcome"], paid.json()["discount_cents"]) == (
        200,
        "redeemed",
        2000,
    )
    assert client.post(f"/api/orders/{order}/redeem").json() == paid.json()
    assert one(settings, "SELECT discount_cents FROM orders WHERE order_id = %s", order) == 2000

    # A merchant's refund before fulfilment gives the use back.
    move(pool, order, "paid")
    back = client.post(f"/api/orders/{order}/refund", json={"refunded_by": "merchant"})
    assert (back.status_code, conforms(back.json(), "CheckoutAnswer")["outcome"]) == (200, "returned")
    assert uses(settings, code) == 0
    assert client.post(f"/api/orders/{order}/refund", json={"refunded_by": "merchant"}).json() == back.json()

    # Used again by a new order; a buyer's refund voids the use: it stays spent.
    second = order_id()
    assert client.post(f"/api/orders/{second}/reserve", json=cart_body(member, [code])).status_code == 200
    assert client.post(f"/api/orders/{second}/redeem").json()["outcome"] == "redeemed"
    move(pool, second, "paid")
    voided = client.post(f"/api/orders/{second}/refund", json={})
    assert voided.json()["outcome"] == "voided"
    assert uses(settings, code) == 1
    state = "SELECT state, voided_at IS NOT NULL FROM promo_uses WHERE order_id = %s"
    assert one(settings, state, second) == ("redeemed", True)
    verify_clean(settings)


def test_release_and_the_sweep_give_the_use_back(settings, pool):
    rate, _, _, act = three_kinds(settings)
    code = promo(settings, rate, "ONEUSE", max_uses=1)
    member, _, _ = member_with_package(pool, settings, act["slug"])
    now = utcnow()
    cart = Cart(amount_cents=10_000, items=1, at=now)
    cancelled, lapsed, last = order_id(), order_id(), order_id()
    assert service.reserve(pool, cancelled, member_id=member, cart=cart, codes=[code]).outcome == "reserved"
    full = service.reserve(pool, order_id(), member_id=member, cart=cart, codes=[code])
    assert full.reason is LifecycleRefusal.PROMO_EXHAUSTED
    assert service.release(pool, cancelled, at=now).outcome == "released"
    assert uses(settings, code) == 0
    hold = timedelta(minutes=5)
    assert (
        service.reserve(pool, lapsed, member_id=member, cart=cart, codes=[code], hold=hold).outcome
        == "reserved"
    )
    assert service.release_timed_out(pool, now=now + hold) == 1
    assert uses(settings, code) == 0
    assert service.redeem(pool, lapsed, at=now + hold).reason is LifecycleRefusal.RESERVATION_EXPIRED
    assert service.reserve(pool, last, member_id=member, cart=cart, codes=[code]).outcome == "reserved"
    assert service.redeem(pool, last, at=now).outcome == "redeemed"
    assert uses(settings, code) == 1


def test_a_promo_code_keeps_the_rules_of_its_template_and_its_window(settings, pool):
    _, off, _, act = three_kinds(settings)
    member, _, _ = member_with_package(pool, settings, act["slug"])
    code = promo(settings, off, "TENOFF")  # 5.00 off from 50.00
    soon = promo(settings, off, "LATER", valid_from=utcnow() + timedelta(days=1))
    small = Cart(amount_cents=4_000, items=1, at=utcnow())
    assert service.validate(pool, order_id(), member_id=member, cart=small, codes=[code]).reason is (
        LifecycleRefusal.BELOW_THRESHOLD
    )
    big = Cart(amount_cents=6_000, items=1, at=utcnow())
    assert service.validate(pool, order_id(), member_id=member, cart=big, codes=[soon]).reason is (
        LifecycleRefusal.NOT_YET_VALID
    )
    with pytest.raises(BackOfficeError, match="max uses"):
        promo(settings, off, "ZERO", max_uses=0)
    with pytest.raises(BackOfficeError, match="exists already"):
        promo(settings, off, "TENOFF")
    with pytest.raises(BackOfficeError, match="no template"):
        promo(settings, "ZZZZZ", "NOTEMPLATE")


RACERS = 8
ROUNDS = 5


def test_checkouts_racing_for_the_last_use_of_a_promo_code_never_pass_the_cap(settings, pool):
    """RACERS members, each with its own order, reserve then pay the same
    promo code at once, with one use left; many rounds. Exactly one wins;
    the others are refused promo_exhausted; the count never passes the cap."""
    rate, _, _, act = three_kinds(settings, codes=RACERS)
    members = [member_with_package(pool, settings, act["slug"])[0] for _ in range(RACERS)]
    for round_no in range(ROUNDS):
        code = promo(settings, rate, f"LAST{round_no}", max_uses=3)
        # Two uses taken already by earlier orders: one left.
        for member in members[:2]:
            held = order_id()
            cart = Cart(amount_cents=10_000, items=1, at=utcnow())
            assert (
                service.reserve(pool, held, member_id=member, cart=cart, codes=[code]).outcome == "reserved"
            )
        answers: dict[str, list[service.CheckoutAnswer]] = {}
        start = threading.Barrier(RACERS)

        def checkout(
            member: int, code: str = code, start: threading.Barrier = start, answers=answers
        ) -> None:
            order = order_id()
            cart = Cart(amount_cents=10_000, items=1, at=utcnow())
            start.wait()
            held = service.reserve(pool, order, member_id=member, cart=cart, codes=[code])
            paid = service.redeem(pool, order, at=utcnow())
            answers[order] = [held, paid]

        threads = [threading.Thread(target=checkout, args=(m,)) for m in members]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        won = [o for o, (_, paid) in answers.items() if paid.outcome == "redeemed"]
        assert len(answers) == RACERS and len(won) == 1, answers
        lost = [held.reason for o, (held, _) in answers.items() if o not in won]
        assert set(lost) == {LifecycleRefusal.PROMO_EXHAUSTED}
        assert uses(settings, code) == 3
        live = (
            "SELECT count(*) FROM promo_uses u JOIN promo_codes p USING (promo_id)"
            " WHERE p.code = %s AND state <> 'released'"
        )
        assert one(settings, live, code) == 3


def test_checkouts_racing_through_the_http_api_for_the_last_use(settings, pool, client):
    """The same race played by the order system: RACERS threads, each its
    own member and order, reserve then pay over HTTP at once; one use left.
    Exactly one redeems; the others get 409 promo_exhausted."""
    rate, _, _, act = three_kinds(settings, codes=RACERS)
    members = [member_with_package(pool, settings, act["slug"])[0] for _ in range(RACERS)]
    code = promo(settings, rate, "HTTPLAST", max_uses=1)
    answers: list[tuple[int, dict[str, Any], dict[str, Any]]] = []
    start = threading.Barrier(RACERS)

    def checkout(member: int) -> None:
        order = order_id()
        start.wait()
        held = client.post(f"/api/orders/{order}/reserve", json=cart_body(member, [code]))
        paid = client.post(f"/api/orders/{order}/redeem")
        answers.append((held.status_code, held.json(), paid.json()))

    threads = [threading.Thread(target=checkout, args=(m,)) for m in members]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(answers) == RACERS
    won = [a for a in answers if a[2]["outcome"] == "redeemed"]
    assert len(won) == 1, answers
    lost = [(status, held["reason"]) for status, held, paid in answers if paid["outcome"] != "redeemed"]
    assert set(lost) == {(409, "promo_exhausted")}
    assert uses(settings, code) == 1


def test_one_member_racing_for_a_per_member_limit_uses_it_once(settings, pool):
    rate, _, _, act = three_kinds(settings)
    member, _, _ = member_with_package(pool, settings, act["slug"])
    code = promo(settings, rate, "ONCEEACH", max_uses=100, per_member_limit=1)
    answers: list[service.CheckoutAnswer] = []
    start = threading.Barrier(RACERS)

    def checkout() -> None:
        cart = Cart(amount_cents=10_000, items=1, at=utcnow())
        start.wait()
        answers.append(service.reserve(pool, order_id(), member_id=member, cart=cart, codes=[code]))

    threads = [threading.Thread(target=checkout) for _ in range(RACERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(a.outcome for a in answers) == ["refused"] * (RACERS - 1) + ["reserved"]
    assert {a.reason for a in answers if a.reason} == {LifecycleRefusal.PER_PERSON_LIMIT}
    assert uses(settings, code) == 1


# --- written off without an order ---------------------------------------------


def issuance(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ISSUANCE_")}
    return subprocess.run(
        [sys.executable, "-m", "issuance.shared.cli", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_an_operator_writes_off_a_printed_code_once_with_an_audit_record(settings, pool, service_env):
    rate, _, gift, act = three_kinds(settings)
    printed = one(settings, "SELECT code FROM codes WHERE status = 'available' ORDER BY seq LIMIT 1")
    done = issuance(
        service_env, "coupons", "write-off", printed, "--by", "alice", "--reason", "store voucher 42"
    )
    assert (done.returncode, done.stdout.strip()) == (0, f"{printed}: written off"), done.stderr
    again = issuance(service_env, "coupons", "write-off", printed, "--by", "bob", "--reason", "twice")
    assert again.returncode == 0 and "already, by alice" in again.stdout
    audit = rows(settings, "SELECT code, channel, written_off_by, reason, member_id FROM code_writeoffs")
    assert audit == [(printed, "operator", "alice", "store voucher 42", None)]
    assert one(settings, "SELECT status FROM codes WHERE code = %s", printed) == "written_off"

    # A coupon of a kind used in orders, and one already used: refused, one line, the reason.
    member, codes, _ = member_with_package(pool, settings, act["slug"])
    discount = next(c for c in codes if c.startswith(rate))
    refused = issuance(service_env, "coupons", "write-off", discount, "--by", "alice", "--reason", "x")
    assert refused.returncode != 0 and "needs_an_order" in refused.stderr
    assert "Traceback" not in refused.stderr
    gift_code = next(c for c in codes if c.startswith(gift))
    cart = Cart(amount_cents=10_000, items=1, at=utcnow())
    order = order_id()
    service.reserve(pool, order, member_id=member, cart=cart, codes=[gift_code])
    held = issuance(service_env, "coupons", "write-off", gift_code, "--by", "alice", "--reason", "x")
    assert held.returncode != 0 and "held_by_another_order" in held.stderr
    service.redeem(pool, order, at=utcnow())
    used = issuance(service_env, "coupons", "write-off", gift_code, "--by", "alice", "--reason", "x")
    assert used.returncode != 0 and "already_used" in used.stderr
    blank = issuance(service_env, "coupons", "write-off", printed, "--by", "", "--reason", "x")
    assert blank.returncode != 0 and "--by" in blank.stderr
    assert len(rows(settings, "SELECT code FROM code_writeoffs")) == 1
    verify_clean(settings)


def test_a_partner_writes_off_a_gift_coupon_through_the_api(settings, pool, client):
    _, _, gift, act = three_kinds(settings)
    member, codes, _ = member_with_package(pool, settings, act["slug"])
    gift_code = next(c for c in codes if c.startswith(gift))
    body = {"partner": "cinema-7", "reason": "ticket 0042"}
    first = client.post(f"/api/codes/{gift_code}/write-off", json=body)
    assert first.status_code == 200, first.text
    answer = conforms(first.json(), "WriteOffAnswer")
    assert (answer["outcome"], answer["repeated"], answer["record"]["member_id"]) == (
        "written_off",
        False,
        member,
    )
    again = client.post(f"/api/codes/{gift_code}/write-off", json={"partner": "other", "reason": "again"})
    assert again.status_code == 200 and again.json()["repeated"] is True
    assert again.json()["record"] == answer["record"]
    # Written off: checkout no longer takes it, and says why.
    cart = Cart(amount_cents=10_000, items=1, at=utcnow())
    refused = service.reserve(pool, order_id(), member_id=member, cart=cart, codes=[gift_code])
    assert refused.reason is LifecycleRefusal.WRITTEN_OFF
    listed = client.get(f"/api/members/{member}/coupons", params={"amount_cents": 10_000, "items": 1})
    shown = {c["code"]: c for c in conforms(listed.json(), "CouponList")["coupons"]}[gift_code]
    assert (shown["status"], shown["applicable"], shown["reason"]) == ("written_off", False, "written_off")
    unknown = client.post("/api/codes/NOSUCHCODE/write-off", json=body)
    assert (unknown.status_code, conforms(unknown.json(), "WriteOffAnswer")["reason"]) == (
        404,
        "unknown_code",
    )
    bad = client.post(f"/api/codes/{gift_code}/write-off", json={"partner": "x"})
    assert bad.status_code == 422 and conforms(bad.json(), "Error")
    audit = rows(
        settings, "SELECT channel, written_off_by, reason FROM code_writeoffs WHERE code = %s", gift_code
    )
    assert audit == [("partner", "cinema-7", "ticket 0042")]
    verify_clean(settings)


# --- the per-code export and the report ---------------------------------------


def test_the_per_code_export_has_the_report_totals(settings, pool, service_env, tmp_path):
    import csv
    import io

    from issuance.shared.backoffice import reports

    rate, _, gift, act = three_kinds(settings)
    code = promo(settings, rate, "EXPORTME", max_uses=10)
    first, codes, _ = member_with_package(pool, settings, act["slug"])
    second, _, _ = member_with_package(pool, settings, act["slug"], channel="partner-app")
    cart = Cart(amount_cents=10_000, items=1, at=utcnow())
    used = next(c for c in codes if c.startswith(rate))
    paid, promo_order = order_id(), order_id()
    assert service.reserve(pool, paid, member_id=first, cart=cart, codes=[used]).outcome == "reserved"
    assert service.redeem(pool, paid, at=utcnow()).outcome == "redeemed"
    move(pool, paid, "paid")
    assert service.reserve(pool, promo_order, member_id=second, cart=cart, codes=[code]).outcome == "reserved"
    assert service.redeem(pool, promo_order, at=utcnow()).outcome == "redeemed"
    gift_code = next(c for c in codes if c.startswith(gift))
    wrote = issuance(service_env, "coupons", "write-off", gift_code, "--by", "alice", "--reason", "gift card")
    assert wrote.returncode == 0, wrote.stderr

    out = tmp_path / "usage.csv"
    done = issuance(service_env, "codes", "usage", "--activity", act["slug"], "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    lines = list(csv.DictReader(io.StringIO(out.read_text())))
    by_code = {(x["kind"], x["code"], x["order_id"]): x for x in lines}
    line = by_code[("coupon", used, paid)]
    assert (line["status"], line["member_id"], line["discount_cents"]) == ("used", str(first), "1000")
    assert line["claimed_at"] and line["used_at"] and line["channel"] == "test"
    promo_line = by_code[("promo", code, promo_order)]
    assert (promo_line["member_id"], promo_line["discount_cents"]) == (str(second), "1000")
    channels = {x["channel"] for x in lines if x["kind"] == "coupon" and x["member_id"] == str(second)}
    assert channels == {"partner-app"}
    written = by_code[("coupon", gift_code, "")]
    assert (written["status"], written["written_off_by"]) == ("written_off", "operator:alice")

    with psycopg.connect(settings.database_url) as conn:
        report = reports.activity_report(conn, act["slug"])
    coupons = [x for x in lines if x["kind"] == "coupon" and x["claimed_at"]]
    assert report.coupons_claimed == len(coupons)
    assert report.coupons_used == sum(x["status"] == "used" for x in coupons)
    assert report.total_discount_cents == sum(
        int(x["discount_cents"]) for x in coupons if x["status"] == "used"
    )
    assert report.coupons_written_off == sum(x["status"] == "written_off" for x in coupons) == 1
    promo_lines = [x for x in lines if x["kind"] == "promo"]
    assert (report.promo_uses, report.promo_discount_cents) == (
        len(promo_lines),
        sum(int(x["discount_cents"]) for x in promo_lines),
    )
    shown = issuance(service_env, "report", "--activity", act["slug"])
    assert "written off / promo code uses (discount)" in shown.stdout and "1 / 1 (10.00)" in shown.stdout

    # Never through a symbolic link, never over a file without --force.
    link = tmp_path / "link.csv"
    link.symlink_to(tmp_path / "elsewhere.csv")
    refused = issuance(
        service_env, "codes", "usage", "--activity", act["slug"], "--out", str(link), "--force"
    )
    assert refused.returncode != 0 and "symbolic link" in refused.stderr
    assert not (tmp_path / "elsewhere.csv").exists()
    again = issuance(service_env, "codes", "usage", "--activity", act["slug"], "--out", str(out))
    assert again.returncode != 0 and "exists" in again.stderr


def test_a_write_off_racing_a_checkout_for_one_gift_coupon_lets_one_win(settings, pool):
    """A partner writes a gift coupon off while an order reserves and pays
    it, started together; many rounds. The code is either written off or
    used, never both, and the loser is refused with the reason."""
    _, _, gift, act = three_kinds(settings, codes=ROUNDS * 2)
    for _ in range(ROUNDS * 2):
        member, codes, _ = member_with_package(pool, settings, act["slug"])
        code = next(c for c in codes if c.startswith(gift))
        order = order_id()
        start = threading.Barrier(3)
        results: dict[str, Any] = {}

        def checkout(
            code: str = code, member: int = member, order: str = order, start=start, results=results
        ):
            cart = Cart(amount_cents=10_000, items=1, at=utcnow())
            start.wait()
            results["held"] = service.reserve(pool, order, member_id=member, cart=cart, codes=[code])
            results["paid"] = service.redeem(pool, order, at=utcnow())

        def partner(name: str, code: str = code, start=start, results=results) -> None:
            start.wait()
            results[name] = service.write_off(pool, code, partner=name, reason="counter", at=utcnow())

        threads = [
            threading.Thread(target=checkout),
            threading.Thread(target=partner, args=("p1",)),
            threading.Thread(target=partner, args=("p2",)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        status = one(settings, "SELECT status FROM codes WHERE code = %s", code)
        audits = rows(settings, "SELECT written_off_by FROM code_writeoffs WHERE code = %s", code)
        offs = [results[p] for p in ("p1", "p2")]
        if results["paid"].outcome == "redeemed":
            assert status == "used" and audits == []
            assert {o.refusal for o in offs} <= {
                LifecycleRefusal.HELD_BY_ANOTHER_ORDER,
                LifecycleRefusal.ALREADY_USED,
            }
        else:
            assert status == "written_off" and len(audits) == 1
            assert results["held"].reason is LifecycleRefusal.WRITTEN_OFF
            # Both partners get the one record: the second as a repeat.
            assert sorted(o.repeated for o in offs) == [False, True]
            assert {o.record.written_off_by for o in offs if o.record} == {audits[0][0]}
    verify_clean(settings)


def test_the_order_events_refund_settles_promo_uses_like_coupons(settings, pool):
    rate, _, _, act = three_kinds(settings)
    code = promo(settings, rate, "EVENTS", max_uses=2)
    member, _, _ = member_with_package(pool, settings, act["slug"])
    cart = Cart(amount_cents=10_000, items=1, at=utcnow())
    cancelled, refunded = order_id(), order_id()
    service.reserve(pool, cancelled, member_id=member, cart=cart, codes=[code])
    service.reserve(pool, refunded, member_id=member, cart=cart, codes=[code])
    assert uses(settings, code) == 2
    # order-status-changed: cancelled before payment gives the use back.
    assert move(pool, cancelled, "cancelled").outcome == "ok"
    assert uses(settings, code) == 1
    service.redeem(pool, refunded, at=utcnow())
    assert move(pool, refunded, "paid").outcome == "ok"
    assert move(pool, refunded, "refunded").outcome == "ok"  # a buyer's refund after payment: voided
    assert uses(settings, code) == 1
    assert service.refund(pool, refunded, at=utcnow()).outcome == "voided"  # the API agrees
    state = "SELECT state, release_reason, voided_at IS NOT NULL FROM promo_uses WHERE order_id = %s"
    assert one(settings, state, cancelled) == ("released", "order_cancelled", False)
    assert one(settings, state, refunded) == ("redeemed", None, True)


def test_an_order_with_a_coupon_and_a_promo_code_reconciles(settings, pool, client):
    """Verify adds the promo use's discount to the coupons' when it checks an
    order's discount: a paid order using both is not a breach."""
    rate, off, _, act = three_kinds(settings)
    code = promo(settings, off, "DUO500", max_uses=3)
    member, codes, _ = member_with_package(pool, settings, act["slug"])
    coupon = next(c for c in codes if c.startswith(rate))

    order = order_id()
    reserved = client.post(f"/api/orders/{order}/reserve", json=cart_body(member, [coupon, code]))
    assert (reserved.status_code, reserved.json()["outcome"]) == (200, "reserved"), reserved.json()
    paid = client.post(f"/api/orders/{order}/redeem")
    # 10% of 200.00 from the coupon and 5.00 off from the promo code.
    assert (paid.status_code, paid.json()["discount_cents"]) == (200, 2000 + 500), paid.json()
    assert one(settings, "SELECT discount_cents FROM orders WHERE order_id = %s", order) == 2500
    verify_clean(settings)
