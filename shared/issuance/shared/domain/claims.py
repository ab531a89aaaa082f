"""The claim decision: which claims of a batch are refused, and why, and
which are granted, with what.

Everything the decision depends on comes in as values (the claims, their
activities, the packages the members already hold, the free package slots
and codes, the time), so the rules and the order in which refusals win are
tested without a database. The worker loads those values, calls
:func:`decide_claims` and writes what it returns, all in one transaction.
"""

from __future__ import annotations

import dataclasses
import enum
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import NamedTuple

from issuance.shared.domain import (
    ActivityRules,
    Refusal,
    TemplateRef,
    coupon_expiry,
    is_new_user,
    templates_to_bind,
    window_refusal,
)
from issuance.shared.domain.regions import outside


class ClaimStatus(enum.StrEnum):
    """Where a claim stands. The first three are stored in ``claims.status``
    (a check constraint lists them); the values are stable, also in JSON."""

    CREDITED = "credited"  # codes bound and written to the member's wallet
    BOUND = "bound"  # codes bound; the credit step writes the wallet
    REFUSED = "refused"  # with a Refusal reason
    # An outcome only, never stored: the claim ID was already recorded with
    # another payload.
    CONFLICT = "conflict"


# The order in which refusals win when more than one applies: the first that
# applies is the reason given. Offline is "ended" whatever the time, so ENDED
# comes before NOT_STARTED (the window itself cannot be both).
REFUSAL_PRECEDENCE: tuple[Refusal, ...] = (
    Refusal.UNKNOWN_ACTIVITY,
    Refusal.ENDED,
    Refusal.NOT_STARTED,
    Refusal.BAD_PHONE,
    Refusal.OUTSIDE_REGION,
    Refusal.ALREADY_RECEIVED,
    Refusal.SIMILAR_ACTIVITY,
    Refusal.SOLD_OUT,
    Refusal.POOL_EMPTY,
)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ActivityTerms:
    """What the claim decision needs to know about an activity."""

    activity_id: int
    slug: str
    rules: ActivityRules
    timezone: str
    exclusivity_group: str
    validity_days: int | None
    valid_until: datetime | None
    hold_until_registered: bool
    templates: tuple[TemplateRef, ...]
    # The cities or provinces it is limited to (none: everywhere).
    regions: tuple[str, ...] = ()


# The records made per claim (requests, holdings, decisions) are named
# tuples: immutable like the frozen dataclasses elsewhere, and about three
# times cheaper to build, which counts on the hot path at 5,000 claims/s.


class ClaimRequest(NamedTuple):
    """One claim as the decision sees it.

    ``activity`` is None for an activity that does not exist. ``phone`` is
    the number in E.164 form, None when it is not a valid mobile number.
    ``member_id`` is the member behind the number. The number is read only
    for a claim that :func:`activity_refusal` lets through, and the member
    looked up only for one that :func:`screen` lets through: for the others
    they are None and never used.
    """

    claim_id: uuid.UUID
    activity: ActivityTerms | None
    requested_at: datetime
    phone: str | None = None
    member_id: int | None = None
    # When the member registered in the app, if it did ("new user" reads it).
    registered_at: datetime | None = None


class Holding(NamedTuple):
    """A package a member already holds: its activity and exclusivity group."""

    activity_id: int
    group: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Stock:
    """The free package slots per activity and the available codes per
    template that a batch may hand out, each taken from the end."""

    slots: Mapping[int, Sequence[int]]
    codes: Mapping[int, Sequence[str]]


class Refused(NamedTuple):
    """A claim refused, with the reason the member is given."""

    reason: Refusal


class Granted(NamedTuple):
    """A package: one package slot, and one code per template to bind."""

    activity: ActivityTerms
    member_id: int
    slot_no: int
    templates: tuple[TemplateRef, ...]
    codes: tuple[str, ...]  # codes[i] is bound for templates[i]
    expires_at: datetime
    new_member: bool
    # CREDITED: written to the wallet with the binding; BOUND: left to the
    # credit step (which may hold it until the member registers).
    status: ClaimStatus


Decision = Refused | Granted


def claimed_at(requested_at: datetime, now: datetime) -> datetime:
    """When a claim counts as made: the promise and the window run from the
    moment the member asked, but a publisher's clock is not trusted to be
    ahead of ours."""
    return min(requested_at, now)


def activity_refusal(activity: ActivityTerms | None, at: datetime) -> Refusal | None:
    """Unknown activity, or claimed outside its window: the refusals that
    come before the number is even read."""
    if activity is None:
        return Refusal.UNKNOWN_ACTIVITY
    return window_refusal(activity.rules, at)


def screen(request: ClaimRequest, at: datetime) -> Refusal | None:
    """The refusals that need no member and no stock: unknown activity,
    window, bad number, a number from outside the activity's regions."""
    refusal = activity_refusal(request.activity, at)
    if refusal is not None:
        return refusal
    if request.phone is None:
        return Refusal.BAD_PHONE
    activity = request.activity
    # Only an activity limited to some regions reads the number's region.
    if activity is not None and activity.regions and outside(activity.regions, request.phone):
        return Refusal.OUTSIDE_REGION
    return None


class _Batch:
    """What the claims decided so far in a batch have taken: packages now
    held, slots and codes handed out."""

    def __init__(self, holdings: Mapping[int, Sequence[Holding]], stock: Stock) -> None:
        self.held = {member: list(held) for member, held in holdings.items()}
        self.slots = {activity: list(slots) for activity, slots in stock.slots.items()}
        self.codes = {template: list(codes) for template, codes in stock.codes.items()}

    def refusal(
        self, activity: ActivityTerms, held: Sequence[Holding], templates: Sequence[TemplateRef]
    ) -> Refusal | None:
        """The refusals that depend on the member and the stock, in order."""
        if any(h.activity_id == activity.activity_id for h in held):
            return Refusal.ALREADY_RECEIVED
        if any(h.group == activity.exclusivity_group for h in held):
            return Refusal.SIMILAR_ACTIVITY
        if not self.slots.get(activity.activity_id):
            return Refusal.SOLD_OUT
        if any(not self.codes.get(t.template_id) for t in templates):
            return Refusal.POOL_EMPTY
        return None


def decide_claims(
    requests: Sequence[ClaimRequest],
    *,
    holdings: Mapping[int, Sequence[Holding]],
    stock: Stock,
    now: datetime,
    credit_inline: bool,
) -> list[Decision]:
    """Decide each claim, in order: refused with the first reason of
    :data:`REFUSAL_PRECEDENCE` that applies, or granted. A grant counts for
    the claims after it in the batch: one package per member per activity and
    per exclusivity group, and no slot or code handed out twice.

    ``holdings`` are the packages each member of the batch already holds;
    ``credit_inline`` says whether a grant may be credited with its binding
    (unless its activity holds credits until the member registers).
    """
    batch = _Batch(holdings, stock)
    return [_decide(request, batch, now, credit_inline) for request in requests]


def _decide(request: ClaimRequest, batch: _Batch, now: datetime, credit_inline: bool) -> Decision:
    at = claimed_at(request.requested_at, now)
    refusal = screen(request, at)
    if refusal is not None:
        return Refused(refusal)
    activity, member_id = request.activity, request.member_id
    assert activity is not None and member_id is not None, "a screened claim has an activity and a member"
    held = batch.held.setdefault(member_id, [])
    new_member = is_new_user(holds_packages=bool(held), registered_at=request.registered_at, at=at)
    templates = tuple(templates_to_bind(activity.templates, new_member=new_member))
    refusal = batch.refusal(activity, held, templates)
    if refusal is not None:
        return Refused(refusal)
    held.append(Holding(activity.activity_id, activity.exclusivity_group))
    return Granted(
        activity=activity,
        member_id=member_id,
        slot_no=batch.slots[activity.activity_id].pop(),
        templates=templates,
        codes=tuple(batch.codes[t.template_id].pop() for t in templates),
        expires_at=coupon_expiry(
            at,
            zone=activity.timezone,
            validity_days=activity.validity_days,
            valid_until=activity.valid_until,
        ),
        new_member=new_member,
        status=ClaimStatus.CREDITED
        if credit_inline and not activity.hold_until_registered
        else ClaimStatus.BOUND,
    )
