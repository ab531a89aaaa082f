"""The coupon at checkout, as plain functions: which of a member's coupons
apply to a cart, why the others do not, what each saves, and which is best.

The synchronous checkout API and the asynchronous ``order-placed`` path share
these rules (:func:`issuance.shared.domain.coupons.discount_cents` is the one
discount formula). Like the rest of issuance.shared.domain, this module
imports no database, broker or network code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from datetime import datetime

from issuance.shared.domain.coupons import LifecycleRefusal, discount_cents, holder_refusal, time_refusal

KINDS = frozenset(("discount_rate", "amount_off", "gift"))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class WalletCoupon:
    """One code as checkout sees it. ``held_by`` is the order that holds it:
    a live reservation, or the order it was used in."""

    code: str
    member_id: int | None
    kind: str
    value: int
    threshold_cents: int
    valid_from: datetime | None
    expires_at: datetime | None
    status: str
    credited: bool = True
    held_by: str | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Cart:
    """What is being bought: the amount in minor units, the number of items
    (recorded with a reservation; the minimum-item-count scope will read it),
    and when (the instant the validity window is checked against)."""

    amount_cents: int
    items: int
    at: datetime

    def __post_init__(self) -> None:
        for name in ("amount_cents", "items"):
            number = getattr(self, name)
            if type(number) is not int or number < 0:
                raise ValueError(f"{name} must be a non-negative integer, not {number!r}")
        if self.at.tzinfo is None:
            raise ValueError("the cart's time must carry a time zone")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CouponOption:
    """One coupon against one cart: the saving, or the reason it does not apply."""

    coupon: WalletCoupon
    reason: LifecycleRefusal | None
    discount_cents: int

    @property
    def applicable(self) -> bool:
        return self.reason is None

    @property
    def reason_text(self) -> str | None:
        return None if self.reason is None else self.reason.text


def checkout_refusal(
    coupon: WalletCoupon, cart: Cart, *, member_id: int, order_id: str | None = None
) -> LifecycleRefusal | None:
    """Why ``coupon`` cannot pay part of ``cart`` for ``member_id`` (in
    ``order_id``, when one is being created); None when it can. A coupon
    already held or used by that very order still applies (idempotent)."""
    if coupon.kind not in KINDS:
        raise ValueError(f"unknown coupon kind {coupon.kind!r}")
    mine = order_id is not None and coupon.held_by == order_id
    refusal = _whose(coupon, member_id=member_id, mine=mine)
    if refusal is None and coupon.status != "used":
        refusal = _when(coupon, cart)
    if refusal is None and coupon.kind == "amount_off" and cart.amount_cents < coupon.threshold_cents:
        # Also for a coupon this very order used: asked again, it answers as
        # it did, unless the cart asked about no longer reaches the threshold.
        refusal = LifecycleRefusal.BELOW_THRESHOLD
    return refusal


def _whose(coupon: WalletCoupon, *, member_id: int, mine: bool) -> LifecycleRefusal | None:
    """Refusals about who holds the coupon: issued, owned, live, free."""
    refusal = holder_refusal(status=coupon.status, owner=coupon.member_id, member_id=member_id)
    if refusal is None and coupon.status == "used" and not mine:
        refusal = LifecycleRefusal.ALREADY_USED
    if refusal is None and coupon.held_by is not None and not mine:
        refusal = LifecycleRefusal.HELD_BY_ANOTHER_ORDER
    return refusal


def _when(coupon: WalletCoupon, cart: Cart) -> LifecycleRefusal | None:
    """Refusals about time: expired, not yet valid, not in the wallet yet."""
    return time_refusal(
        status=coupon.status,
        expires_at=coupon.expires_at,
        valid_from=coupon.valid_from,
        credited=coupon.credited,
        at=cart.at,
    )


def evaluate(
    coupon: WalletCoupon, cart: Cart, *, member_id: int, order_id: str | None = None
) -> CouponOption:
    """The saving ``coupon`` gives on ``cart`` (never more than the cart), or
    why it gives none."""
    reason = checkout_refusal(coupon, cart, member_id=member_id, order_id=order_id)
    if reason is not None:
        return CouponOption(coupon=coupon, reason=reason, discount_cents=0)
    off = discount_cents(
        kind=coupon.kind,
        value=coupon.value,
        threshold_cents=coupon.threshold_cents,
        amount_cents=cart.amount_cents,
    )
    return CouponOption(coupon=coupon, reason=None, discount_cents=off)


def rank_key(option: CouponOption) -> tuple[bool, int, bool, float, str]:
    """Applicable first; then the largest saving; among equals the soonest to
    expire (a coupon without an expiry last); then by code."""
    expires = option.coupon.expires_at
    return (
        not option.applicable,
        -option.discount_cents,
        expires is None,
        0.0 if expires is None else expires.timestamp(),
        option.coupon.code,
    )


def options_for(
    coupons: Iterable[WalletCoupon], cart: Cart, *, member_id: int, order_id: str | None = None
) -> list[CouponOption]:
    """Every coupon against the cart, best first (see :func:`rank_key`)."""
    options = [evaluate(c, cart, member_id=member_id, order_id=order_id) for c in coupons]
    return sorted(options, key=rank_key)


def best(options: Sequence[CouponOption]) -> CouponOption | None:
    """The best applicable option of a ranked list, if any applies."""
    return options[0] if options and options[0].applicable else None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ChosenSet:
    """A chosen set of codes against one cart: what each saves (together
    never more than the cart), and why any of them is refused."""

    lines: tuple[tuple[str, int], ...]
    refused: tuple[tuple[str, LifecycleRefusal], ...]

    @property
    def accepted(self) -> bool:
        return not self.refused and bool(self.lines)

    @property
    def discount_cents(self) -> int:
        return sum(off for _, off in self.lines)


def choose(
    codes: Sequence[str],
    coupons: Iterable[WalletCoupon],
    cart: Cart,
    *,
    member_id: int,
    order_id: str | None = None,
) -> ChosenSet:
    """Validate the codes a buyer chose. Each must apply; the savings are
    taken best first and capped so that together they never exceed the cart.
    A code not among ``coupons`` is an unknown code."""
    by_code = {c.code: c for c in coupons}
    refused: list[tuple[str, LifecycleRefusal]] = []
    options = []
    for code in dict.fromkeys(codes):
        coupon = by_code.get(code)
        if coupon is None:
            refused.append((code, LifecycleRefusal.UNKNOWN_CODE))
            continue
        option = evaluate(coupon, cart, member_id=member_id, order_id=order_id)
        if option.reason is not None:
            refused.append((code, option.reason))
        else:
            options.append(option)
    remaining = cart.amount_cents
    lines = []
    for option in sorted(options, key=rank_key):
        off = min(option.discount_cents, remaining)
        remaining -= off
        lines.append((option.coupon.code, off))
    return ChosenSet(lines=tuple(lines), refused=tuple(sorted(refused)))
