"""The coupon at checkout, as plain functions: which of a member's coupons
apply to a cart, why the others do not, what each saves, and which is best.

The synchronous checkout API and the asynchronous ``order-placed`` path share
these rules, a template's own rules (:class:`CouponRules`: scope, stacking,
priority, per-person count) included, and
:func:`issuance.shared.domain.coupons.discount_cents` is the one discount
formula. Like the rest of issuance.shared.domain, this module
imports no database, broker or network code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from datetime import datetime

from issuance.shared.domain.coupons import LifecycleRefusal, discount_cents, holder_refusal, time_refusal

KINDS = frozenset(("discount_rate", "amount_off", "gift"))
# Bounds of the rules an operator sets on a template (the database checks
# the signs and the priority's range): a scope names at most MAX_SCOPE
# entries of at most SCOPE_TEXT characters each.
MAX_SCOPE = 200
SCOPE_TEXT = 64
MAX_PRIORITY = 1000
MAX_RULE_NUMBER = 1_000_000


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CouponRules:
    """A template's rules beyond its kind, value and threshold, stored with
    it. An empty scope restricts nothing; a product or category scope limits
    the coupon to the cart's lines of those products or categories (its
    threshold, item count and saving are then counted on those lines).
    ``stackable`` False makes the coupon exclusive: alone in its order, and
    not with the order's other promotions. Among equal savings, the higher
    ``priority`` comes first (as the best choice, and in a set, where the
    savings are taken in that order). ``per_person_limit`` caps how many
    coupons of the template one member uses, over all orders (None: no cap)."""

    products: frozenset[str] = frozenset()
    categories: frozenset[str] = frozenset()
    stores: frozenset[str] = frozenset()
    min_items: int = 0
    min_member_level: int = 0
    stackable: bool = True
    priority: int = 0
    per_person_limit: int | None = None

    @property
    def item_scoped(self) -> bool:
        return bool(self.products or self.categories)


ANY = CouponRules()


def rules_problem(rules: CouponRules) -> str | None:
    """What is wrong with ``rules`` as an operator wrote them (each value's
    type as well as its range), or None. The back office refuses a template
    with this message."""
    for name in ("products", "categories", "stores"):
        scope = getattr(rules, name)
        if not isinstance(scope, frozenset) or len(scope) > MAX_SCOPE:
            return f"scope {name} must be a list of at most {MAX_SCOPE} names"
        if not all(isinstance(x, str) and 0 < len(x) <= SCOPE_TEXT and x == x.strip() for x in scope):
            shown = sorted(map(repr, scope))[:3]
            return f"scope {name} must hold names of 1 to {SCOPE_TEXT} characters, got {shown}"
    bounds = (
        ("min_items", 0, MAX_RULE_NUMBER),
        ("min_member_level", 0, MAX_PRIORITY),
        ("priority", 0, MAX_PRIORITY),
    )
    for name, low, high in bounds:
        value = getattr(rules, name)
        if not _whole(value) or not low <= value <= high:
            return f"{name} must be a whole number from {low} to {high}, got {value!r}"
    limit = rules.per_person_limit
    if limit is not None and (not _whole(limit) or not 1 <= limit <= MAX_RULE_NUMBER):
        return f"per_person_limit must be a whole number from 1 to {MAX_RULE_NUMBER} (or none), got {limit!r}"
    if type(rules.stackable) is not bool:
        return f"stackable must be true or false, got {rules.stackable!r}"
    return None


def _whole(value: object) -> bool:
    # bool is an int in Python, never a count here.
    return type(value) is int


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
    template_id: int = 0
    rules: CouponRules = ANY
    # How many other coupons of the same template the member has used or
    # holds for another order (for the per-person count).
    member_uses: int = 0
    # A shared promo code (one string, many members): whether every use
    # its cap allows is taken by other orders. Its ``member_uses`` counts
    # the member's live uses of the code, its rules' ``per_person_limit``
    # is the code's per-member limit.
    promo: bool = False
    exhausted: bool = False


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CartLine:
    """One line of a cart: a product, its category, what the line costs in
    minor units, and how many items it holds."""

    product: str
    category: str = ""
    amount_cents: int
    quantity: int = 1

    def __post_init__(self) -> None:
        _non_negative(self, "amount_cents", "quantity")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Cart:
    """What is being bought: the amount in minor units, the number of items,
    and when (the instant the validity window is checked against); and, for
    coupons with rules, its lines, the store, the member's level and whether
    the order already uses another promotion. A cart that does not say
    (the asynchronous ``order-placed`` event carries no lines) meets no
    scope that needs it."""

    amount_cents: int
    items: int
    at: datetime
    lines: tuple[CartLine, ...] = ()
    store: str | None = None
    member_level: int = 0
    promotions: bool = False

    def __post_init__(self) -> None:
        _non_negative(self, "amount_cents", "items", "member_level")
        if self.at.tzinfo is None:
            raise ValueError("the cart's time must carry a time zone")


def _non_negative(record: object, *names: str) -> None:
    for name in names:
        number = getattr(record, name)
        if type(number) is not int or number < 0:
            raise ValueError(f"{name} must be a non-negative integer, not {number!r}")


def eligible(rules: CouponRules, cart: Cart) -> tuple[int, int]:
    """The part of the cart a coupon applies to: (amount, item count). The
    whole cart, unless the coupon is limited to products or categories."""
    if not rules.item_scoped:
        return cart.amount_cents, cart.items
    lines = [x for x in cart.lines if x.product in rules.products or x.category in rules.categories]
    amount = min(sum(x.amount_cents for x in lines), cart.amount_cents)
    return amount, sum(x.quantity for x in lines)


def scope_refusal(coupon: WalletCoupon, cart: Cart) -> LifecycleRefusal | None:
    """Why the coupon's rules keep it off this cart (store, member level,
    other promotions, eligible items, per-person count), or None."""
    rules = coupon.rules
    amount, items = eligible(rules, cart)
    checks = (
        (bool(rules.stores) and cart.store not in rules.stores, LifecycleRefusal.WRONG_STORE),
        (cart.member_level < rules.min_member_level, LifecycleRefusal.MEMBER_LEVEL_TOO_LOW),
        (not rules.stackable and cart.promotions, LifecycleRefusal.EXCLUDED_BY_PROMOTION),
        (rules.item_scoped and items == 0, LifecycleRefusal.NO_ELIGIBLE_ITEMS),
        (items < rules.min_items, LifecycleRefusal.TOO_FEW_ITEMS),
        (
            rules.per_person_limit is not None and coupon.member_uses >= rules.per_person_limit,
            LifecycleRefusal.PER_PERSON_LIMIT,
        ),
        (coupon.kind == "amount_off" and amount < coupon.threshold_cents, LifecycleRefusal.BELOW_THRESHOLD),
    )
    return next((reason for broken, reason in checks if broken), None)


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
    if refusal is None and coupon.exhausted and not mine:
        refusal = LifecycleRefusal.PROMO_EXHAUSTED
    if refusal is None and coupon.status != "used":
        refusal = _when(coupon, cart)
    if refusal is None:
        # Also for a coupon this very order used: asked again, it answers as
        # it did, unless the cart asked about no longer meets its rules.
        refusal = scope_refusal(coupon, cart)
    return refusal


def _whose(coupon: WalletCoupon, *, member_id: int, mine: bool) -> LifecycleRefusal | None:
    """Refusals about who holds the coupon: issued, owned, live, free."""
    refusal = holder_refusal(status=coupon.status, owner=coupon.member_id, member_id=member_id)
    if refusal is None and coupon.status == "used" and not mine:
        refusal = LifecycleRefusal.ALREADY_USED
    if refusal is None and coupon.held_by is not None and not mine and not coupon.promo:
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
        amount_cents=eligible(coupon.rules, cart)[0],
    )
    return CouponOption(coupon=coupon, reason=None, discount_cents=off)


def rank_key(option: CouponOption) -> tuple[bool, int, int, bool, float, str]:
    """Applicable first; then the largest saving; among equals the higher
    priority, then the soonest to expire (a coupon without an expiry last);
    then by code."""
    expires = option.coupon.expires_at
    return (
        not option.applicable,
        -option.discount_cents,
        -option.coupon.rules.priority,
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
    """Validate the codes a buyer chose. Each must apply on its own and with
    the others: an exclusive (non-stackable) coupon only alone, and no more
    of a template than its per-person count allows. The savings are taken
    best first and capped so that together they never exceed the cart. A
    code not among ``coupons`` is an unknown code."""
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
    options, together = _together(sorted(options, key=rank_key), alone=len(dict.fromkeys(codes)) == 1)
    refused.extend(together)
    remaining = cart.amount_cents
    lines = []
    for option in options:
        off = min(option.discount_cents, remaining)
        remaining -= off
        lines.append((option.coupon.code, off))
    return ChosenSet(lines=tuple(lines), refused=tuple(sorted(refused)))


def _together(
    ranked: Sequence[CouponOption], *, alone: bool
) -> tuple[list[CouponOption], list[tuple[str, LifecycleRefusal]]]:
    """The options that may go in one order together, best first, and the
    refusals of the rest: an exclusive coupon chosen with any other code,
    and the coupons of a template past its per-person count."""
    kept: list[CouponOption] = []
    refused: list[tuple[str, LifecycleRefusal]] = []
    taken: dict[int, int] = {}
    for option in ranked:
        coupon = option.coupon
        limit = coupon.rules.per_person_limit
        if not coupon.rules.stackable and not alone:
            refused.append((coupon.code, LifecycleRefusal.NOT_STACKABLE))
        elif limit is not None and coupon.member_uses + taken.get(coupon.template_id, 0) >= limit:
            refused.append((coupon.code, LifecycleRefusal.PER_PERSON_LIMIT))
        else:
            taken[coupon.template_id] = taken.get(coupon.template_id, 0) + 1
            kept.append(option)
    return kept, refused
