"""The checkout operations as plain Python functions, for an order system
that would rather call a library than the HTTP API (both run this code).

Each operation is one transaction on the pool and is idempotent by order ID:
asking again gives the same answer. A code is live in at most one order,
which the database guarantees (the partial unique index of
``checkout_reservations``), so two checkouts racing for one code cannot
both hold or redeem it.

- :func:`list_coupons`: a member's coupons against a cart, best first
  (:func:`member_of_app` finds the member an app member ID is linked to).
- :func:`validate`: a chosen set of codes against a cart, nothing held.
- :func:`reserve`: hold the chosen codes for an order at its creation.
- :func:`redeem`: at payment, the held codes become used (order, time and
  discount), as the asynchronous ``order-placed`` path records them.
- :func:`release`: on unpaid cancellation, give the held codes back;
  :func:`release_timed_out` does the same for holds that lapsed.
- :func:`refund`: a paid order refunded: a merchant's refund before
  fulfilment gives its codes back, any other voids them (the rule the
  asynchronous ``order-status-changed`` path applies too).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from issuance.shared.db import checkout_store as ks
from issuance.shared.db import coupon_store as cs
from issuance.shared.db import members
from issuance.shared.db import promo_store as ps
from issuance.shared.db import refund_store as rs
from issuance.shared.db.store import Conn
from issuance.shared.domain.checkout import Cart, ChosenSet, CouponOption, WalletCoupon, choose, options_for
from issuance.shared.domain.coupons import LifecycleRefusal
from issuance.shared.domain.refunds import RELEASED_CANCELLED, RELEASED_REFUNDED, CouponFate, coupon_fate
from psycopg_pool import ConnectionPool

log = logging.getLogger(__name__)

# How long an order may hold its coupons unpaid before the sweep releases them.
DEFAULT_HOLD = timedelta(minutes=30)


class Outcome(enum.StrEnum):
    VALID = "valid"
    RESERVED = "reserved"
    REDEEMED = "redeemed"
    RELEASED = "released"
    RETURNED = "returned"
    VOIDED = "voided"
    REFUSED = "refused"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Line:
    code: str
    discount_cents: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CheckoutAnswer:
    """The answer to one operation on one order. When refused, ``reason``
    says why for the order, and ``refused`` names each code's reason."""

    order_id: str
    outcome: Outcome
    lines: tuple[Line, ...] = ()
    refused: tuple[tuple[str, LifecycleRefusal], ...] = ()
    reason: LifecycleRefusal | None = None

    @property
    def discount_cents(self) -> int:
        return sum(line.discount_cents for line in self.lines)

    def as_json(self) -> dict[str, Any]:
        return {
            "order_id": self.order_id,
            "outcome": self.outcome.value,
            "discount_cents": self.discount_cents,
            "coupons": [{"code": x.code, "discount_cents": x.discount_cents} for x in self.lines],
            "refused": [{"code": code, "reason": r.value, "message": r.text} for code, r in self.refused],
            "reason": None if self.reason is None else self.reason.value,
            "message": None if self.reason is None else self.reason.text,
        }


def _refused(
    order_id: str, reason: LifecycleRefusal, per_code: Sequence[tuple[str, LifecycleRefusal]] = ()
) -> CheckoutAnswer:
    return CheckoutAnswer(order_id=order_id, outcome=Outcome.REFUSED, reason=reason, refused=tuple(per_code))


def _from_rows(order_id: str, outcome: Outcome, rows: Sequence[ks.ReservationRow]) -> CheckoutAnswer:
    lines = tuple(Line(code=r.code, discount_cents=r.discount_cents) for r in rows)
    return CheckoutAnswer(order_id=order_id, outcome=outcome, lines=lines)


def _from_choice(order_id: str, outcome: Outcome, chosen: ChosenSet) -> CheckoutAnswer:
    lines = tuple(Line(code=code, discount_cents=off) for code, off in sorted(chosen.lines))
    return CheckoutAnswer(order_id=order_id, outcome=outcome, lines=lines)


def _promos(
    conn: Conn, codes: Sequence[str], coupons: Sequence[WalletCoupon], *, member_id: int, order_id: str
) -> dict[str, tuple[int, WalletCoupon]]:
    """The named codes that are no coupon code but a shared promo code."""
    others = sorted(set(codes) - {c.code for c in coupons})
    return ps.promos_named(conn, others, member_id=member_id, order_id=order_id) if others else {}


def _held(conn: Conn, order_id: str, *, lock: bool = False) -> list[ks.ReservationRow]:
    """An order's reservations and promo code uses, in code order."""
    rows = ks.reservations_of(conn, order_id, lock=lock) + ps.uses_of(conn, order_id, lock=lock)
    return sorted(rows, key=lambda r: r.code)


def _first_reason(chosen: ChosenSet) -> LifecycleRefusal:
    return chosen.refused[0][1] if chosen.refused else LifecycleRefusal.UNKNOWN_CODE


def member_of_app(pool: ConnectionPool, app_member_id: int) -> int | None:
    """The member an app member ID is linked to (by member-registered), if any."""
    with pool.connection() as conn:
        return members.member_of_app(conn, app_member_id)


def unknown_member(order_id: str) -> CheckoutAnswer:
    """The answer for an order whose app member ID is linked to no member."""
    return _refused(order_id, LifecycleRefusal.UNKNOWN_MEMBER)


def list_coupons(pool: ConnectionPool, member_id: int, cart: Cart) -> list[CouponOption]:
    """Every coupon of the member against the cart: applicable or why not,
    the saving, best first."""
    with pool.connection() as conn:
        coupons = ks.wallet(conn, member_id)
    return options_for(coupons, cart, member_id=member_id)


def validate(
    pool: ConnectionPool, order_id: str, *, member_id: int, cart: Cart, codes: Sequence[str]
) -> CheckoutAnswer:
    """Would these codes apply to this cart in this order? Holds nothing."""
    if not codes:
        return _refused(order_id, LifecycleRefusal.UNKNOWN_CODE)
    with pool.connection() as conn:
        coupons = ks.coupons_named(conn, codes)
        promos = _promos(conn, codes, coupons, member_id=member_id, order_id=order_id)
    coupons += [coupon for _, coupon in promos.values()]
    chosen = choose(codes, coupons, cart, member_id=member_id, order_id=order_id)
    if not chosen.accepted:
        return _refused(order_id, _first_reason(chosen), chosen.refused)
    return _from_choice(order_id, Outcome.VALID, chosen)


# Why a held code can no longer be used at payment, by the state it is in;
# kept as the reservation's release reason, so asking again answers alike.
LOST = {
    "cancelled": LifecycleRefusal.CANCELLED,
    "used": LifecycleRefusal.ALREADY_USED,
    "written_off": LifecycleRefusal.WRITTEN_OFF,
}
ORDER_CANCELLED = RELEASED_CANCELLED
TIMEOUT = "timeout"


class _Rollback(Exception):
    """Leave the transaction without a trace, answering ``answer``."""

    def __init__(self, answer: CheckoutAnswer) -> None:
        super().__init__(answer.outcome)
        self.answer = answer


def reserve(
    pool: ConnectionPool,
    order_id: str,
    *,
    member_id: int,
    cart: Cart,
    codes: Sequence[str],
    hold: timedelta = DEFAULT_HOLD,
) -> CheckoutAnswer:
    """Hold ``codes`` for a new order. The order is recorded (placed) with
    its member and amount. Asking again with the same order gives the same
    answer; the same order ID with other values, or a code another order
    holds, is refused with the reason, and nothing is kept."""
    if not codes:
        return _refused(order_id, LifecycleRefusal.UNKNOWN_CODE)
    try:
        with pool.connection() as conn, conn.transaction():
            return _reserve_in(conn, order_id, member_id=member_id, cart=cart, codes=codes, hold=hold)
    except _Rollback as refusal:
        return refusal.answer


def _reserve_in(
    conn: Conn, order_id: str, *, member_id: int, cart: Cart, codes: Sequence[str], hold: timedelta
) -> CheckoutAnswer:
    inserted = cs.insert_order(
        conn,
        order_id=order_id,
        member_id=member_id,
        activity=None,
        amount_cents=cart.amount_cents,
        placed_at=cart.at,
    )
    if not inserted:
        # The order row is locked by this check, so a second request for the
        # same order waits here for the first to finish, then answers alike.
        order = cs.order_by_id(conn, order_id, lock=True)
        assert order is not None
        if (order.member_id, order.amount_cents) != (member_id, cart.amount_cents):
            raise _Rollback(_refused(order_id, LifecycleRefusal.ORDER_CONFLICT))
        held = _held(conn, order_id)
        if held:
            return _repeat(order_id, held, codes)
        if order.status != "placed":
            raise _Rollback(_refused(order_id, LifecycleRefusal.ORDER_CLOSED))
    coupons = ks.coupons_for_update(conn, codes)
    promos = _promos(conn, codes, coupons, member_id=member_id, order_id=order_id)
    coupons += [coupon for _, coupon in promos.values()]
    chosen = choose(codes, coupons, cart, member_id=member_id, order_id=order_id)
    if not chosen.accepted:
        raise _Rollback(_refused(order_id, _first_reason(chosen), chosen.refused))
    # In code order, as the codes were locked: promo codes' counters too.
    for code, off in sorted(chosen.lines):
        if code in promos:
            _take_promo(
                conn, promos[code][0], code, order_id, member_id=member_id, cart=cart, off=off, hold=hold
            )
        elif not ks.insert_reservation(
            conn,
            order_id=order_id,
            code=code,
            member_id=member_id,
            amount_cents=cart.amount_cents,
            items=cart.items,
            discount_cents=off,
            at=cart.at,
            hold_until=cart.at + hold,
        ):
            per_code = [(code, LifecycleRefusal.HELD_BY_ANOTHER_ORDER)]
            raise _Rollback(_refused(order_id, LifecycleRefusal.HELD_BY_ANOTHER_ORDER, per_code))
    return _from_choice(order_id, Outcome.RESERVED, chosen)


def _take_promo(
    conn: Conn,
    promo_id: int,
    code: str,
    order_id: str,
    *,
    member_id: int,
    cart: Cart,
    off: int,
    hold: timedelta,
) -> None:
    """Take a use of a shared promo code for the order, under the cap the
    database holds; a refusal leaves the transaction without a trace."""
    use = ps.UseRequest(
        promo_id=promo_id,
        order_id=order_id,
        member_id=member_id,
        amount_cents=cart.amount_cents,
        items=cart.items,
        discount_cents=off,
        at=cart.at,
        hold_until=cart.at + hold,
    )
    refusal = ps.take_use(conn, use)
    if refusal is not None:
        raise _Rollback(_refused(order_id, refusal, [(code, refusal)]))


def _repeat(order_id: str, held: Sequence[ks.ReservationRow], codes: Sequence[str]) -> CheckoutAnswer:
    """The answer to a reservation asked again: the first one's, when the
    codes are the same."""
    if {r.code for r in held} != set(codes):
        return _refused(order_id, LifecycleRefusal.ORDER_CONFLICT)
    return _state_answer(order_id, held)


def _state_answer(order_id: str, rows: Sequence[ks.ReservationRow]) -> CheckoutAnswer:
    states = {r.state for r in rows}
    if states == {"redeemed"}:
        return _from_rows(order_id, Outcome.REDEEMED, rows)
    if states == {"reserved"}:
        return _from_rows(order_id, Outcome.RESERVED, rows)
    reasons = {r.release_reason for r in rows if r.release_reason is not None}
    if TIMEOUT in reasons:
        return _refused(order_id, LifecycleRefusal.RESERVATION_EXPIRED)
    lost = sorted(reasons - {ORDER_CANCELLED, RELEASED_REFUNDED})
    if lost:
        return _refused(order_id, LifecycleRefusal(lost[0]))
    return _from_rows(order_id, Outcome.RELEASED, rows)


def redeem(pool: ConnectionPool, order_id: str, *, at: datetime) -> CheckoutAnswer:
    """The order is paid: its held codes become used, with the order, the
    time and the discount reserved. Asking again gives the same answer."""
    with pool.connection() as conn, conn.transaction():
        return _redeem_in(conn, order_id, at)


def _redeem_in(conn: Conn, order_id: str, at: datetime) -> CheckoutAnswer:
    rows = _held(conn, order_id, lock=True)
    if not rows:
        return _refused(order_id, LifecycleRefusal.UNKNOWN_ORDER)
    if any(r.state != "reserved" for r in rows):
        answer = _state_answer(order_id, rows)
        if answer.outcome is Outcome.RELEASED:
            return _refused(order_id, LifecycleRefusal.ORDER_CLOSED)
        return answer
    if min(r.hold_until for r in rows) <= at:
        _release_all(conn, order_id, at, TIMEOUT)
        return _refused(order_id, LifecycleRefusal.RESERVATION_EXPIRED)
    to_use = []
    for row in (r for r in rows if not r.promo):
        coupon = cs.coupon_for_use(conn, row.code)
        assert coupon is not None, "a reserved code exists (foreign key)"
        if coupon.status == "used" and coupon.order_id == order_id:
            continue  # the asynchronous order-placed event of this order used it already
        if coupon.status != "unused":
            # Held, yet no longer unused: an operator cancelled it, the expiry
            # sweep reached it, or an order-placed event used it elsewhere.
            # The order's hold ends here.
            reason = LOST.get(coupon.status, LifecycleRefusal.EXPIRED)
            _release_all(conn, order_id, at, reason.value)
            return _refused(order_id, reason)
        to_use.append(row)
    for row in to_use:
        used = cs.use_coupon(conn, code=row.code, order_id=order_id, at=at, discount_cents=row.discount_cents)
        assert used, "a locked, unused code can be used"
    ks.mark_redeemed(conn, order_id, at)
    ps.mark_redeemed(conn, order_id, at)
    cs.set_order_discount(conn, order_id, sum(r.discount_cents for r in rows))
    return _from_rows(order_id, Outcome.REDEEMED, rows)


def _release_all(conn: Conn, order_id: str, at: datetime, reason: str) -> None:
    """End an order's holds: its codes' reservations and its promo code uses."""
    ks.release_order(conn, order_id, at, reason)
    ps.release_order(conn, order_id, at, reason)


def release(pool: ConnectionPool, order_id: str, *, at: datetime) -> CheckoutAnswer:
    """The order was cancelled before payment: its held codes are free again.
    A paid order's coupons are not released (a refund handles them)."""
    with pool.connection() as conn, conn.transaction():
        rows = _held(conn, order_id, lock=True)
        if not rows:
            return _refused(order_id, LifecycleRefusal.UNKNOWN_ORDER)
        if any(r.state == "redeemed" for r in rows):
            return _refused(order_id, LifecycleRefusal.ORDER_ALREADY_PAID)
        _release_all(conn, order_id, at, ORDER_CANCELLED)
    return _from_rows(order_id, Outcome.RELEASED, rows)


def refund(
    pool: ConnectionPool, order_id: str, *, at: datetime, refunded_by: str = "buyer", fulfilled: bool = False
) -> CheckoutAnswer:
    """The paid order is refunded: by the merchant before fulfilment, its
    codes are given back (returned; an expired one comes back expired); any
    other refund voids them (voided: neither usable nor returned). Asking
    again gives the same answer, whatever it asks; so does a refund the
    ``order-status-changed`` path applied first. The order's status and its
    referrals follow that event."""
    with pool.connection() as conn, conn.transaction():
        # The order row first, as the order-status-changed path locks it.
        order = cs.order_by_id(conn, order_id, lock=True)
        rows = _held(conn, order_id, lock=True)
        if order is None or not rows:
            return _refused(order_id, LifecycleRefusal.UNKNOWN_ORDER)
        if _given_back(rows):
            return _from_rows(order_id, Outcome.RETURNED, rows)
        if any(r.state != "redeemed" for r in rows):
            return _refused(order_id, LifecycleRefusal.NOT_PAID)
        shipped = fulfilled or order.status == "fulfilled"
        fate = coupon_fate(
            order_status="fulfilled" if shipped else "paid", new_status="refunded", refunded_by=refunded_by
        )
        rs.settle_coupons(conn, order_id, fate or CouponFate.VOID, at=at, reason=RELEASED_REFUNDED)
        after = _held(conn, order_id)
    outcome = Outcome.RETURNED if _given_back(after) else Outcome.VOIDED
    return _from_rows(order_id, outcome, rows)


def _given_back(rows: Sequence[ks.ReservationRow]) -> bool:
    return all(r.state == "released" and r.release_reason == RELEASED_REFUNDED for r in rows)


def release_timed_out(pool: ConnectionPool, *, now: datetime, batch: int = 1000) -> int:
    """The sweep: release every hold that lapsed unpaid, a batch per
    transaction. Returns how many reservations it released."""
    total = 0
    while True:
        with pool.connection() as conn, conn.transaction():
            released = ks.release_timed_out(conn, now, batch) + ps.release_timed_out(conn, now, batch)
        total += released
        if released < batch:
            break
    if total:
        log.info("released %d checkout reservations whose hold lapsed", total)
    return total


def write_off(
    pool: ConnectionPool, code: str, *, partner: str, reason: str, at: datetime
) -> ps.WriteOffAnswer:
    """A partner redeems a code without an order (a gift coupon, or a code
    exported for a partner or for printing), with an audit record.
    Idempotent: a code written off already answers with its first record."""
    with pool.connection() as conn, conn.transaction():
        return ps.write_off_code(conn, code, channel="partner", by=partner, reason=reason, at=at)
