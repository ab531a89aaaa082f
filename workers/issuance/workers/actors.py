"""The actors. Each one reads its message, calls one handler, and returns.

Run them with ``issuance worker`` (or ``dramatiq issuance.workers.actors``). The broker
is RabbitMQ unless ``ISSUANCE_BROKER=stub`` (the embedded demo)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime

from issuance.shared import gate
from issuance.shared.db import cells as cells_db
from issuance.shared.db.store import Conn
from issuance.shared.domain.cells import route_slot
from issuance.shared.domain.claims import ClaimStatus
from issuance.shared.errors import InvalidMessage, TransientError
from issuance.shared.settings import load_settings
from issuance.shared.wire.messages import (
    ClaimRequested,
    ClaimsRequested,
    CreditRequested,
    MemberRegistered,
    OrderPlaced,
    OrderStatusChanged,
    ReferralCrossed,
    ShareKnown,
    ShareOpened,
    utcnow,
)
from issuance.workers import cell_referrals, handlers, lifecycle
from issuance.workers.batching import GroupCommit
from issuance.workers.broker import build_broker
from issuance.workers.instruments import (
    BUSY_CLAIMS,
    CLAIM_TO_CREDIT,
    CLAIMS,
    CODES_BOUND,
    CREDITS,
    DUPLICATES,
    PROMISE_BREACHES,
)
from issuance.workers.runtime import (
    UnitOfWork,
    dead_letter,
    in_this_cell,
    pipeline_actor,
    resources,
    routed_elsewhere,
    unit_of_work,
)

broker = build_broker(load_settings(), kind=os.environ.get("ISSUANCE_BROKER", "rabbitmq"))


@pipeline_actor(ClaimRequested)
def claim_requested(message: ClaimRequested) -> str:
    """Decide one claim: refuse it, or bind its codes and credit them (or hand
    it to the credit step). Concurrent deliveries in this process share one
    transaction."""
    if not _in_this_cell([message], "claim_requested", batch=None):
        return "dead_letter"
    outcomes = _submit(_prepared([message]), "claim_requested", batch=None)
    if not outcomes:
        return "dead_letter"
    return "duplicate" if outcomes[0].duplicate else "ok"


@pipeline_actor(ClaimsRequested)
def claims_requested(message: ClaimsRequested) -> str:
    """Decide a producer's batch of claims in one transaction; an invalid
    item is dead-lettered alone."""
    for rejected in message.rejected:
        dead_letter(
            "claims",
            "claims_requested",
            rejected.error.reason,
            f"claim {rejected.index} of batch {message.batch_id}: {rejected.error.detail}",
            rejected.payload,
            key=f"{message.batch_id}:{rejected.index}",
        )
    claims = _in_this_cell(message.valid, "claims_requested", batch=message.batch_id)
    if message.valid and not claims:
        return "dead_letter"
    outcomes = _submit(_prepared(claims), "claims_requested", batch=message.batch_id)
    if claims and not outcomes:
        return "dead_letter"
    return "duplicate" if outcomes and all(o.duplicate for o in outcomes) else "ok"


def _submit(
    items: Sequence[handlers.PreparedClaim], actor: str, *, batch: object | None
) -> list[handlers.ClaimOutcome]:
    """Decide the claims; those whose ring slot this cell handed over are
    dead-lettered (wrong_cell), and those whose slot is in a handover make
    the message retry (the others are decided, and duplicates next time)."""
    results = _claims.submit_each(items)
    outcomes, pending = [], None
    for (claim, _, _), result in zip(items, results, strict=True):
        if isinstance(result, HandedOver):
            _wrong_cell(claim, actor, batch, result.to_cell)
        elif isinstance(result, BaseException):
            pending = pending or result
        else:
            outcomes.append(result)
    if pending is not None:
        raise pending
    return outcomes


def _in_this_cell(
    claims: Sequence[ClaimRequested], actor: str, *, batch: object | None
) -> list[ClaimRequested]:
    """The claims whose number routes to this worker's cell. The others are
    dead-lettered (wrong_cell), never decided: a producer with another cell
    map must not split a member's packages over two cells, and forwarding
    on this worker's word is no safer when the two maps disagree."""
    kept = []
    for claim in claims:
        cell = routed_elsewhere(claim.phone)
        if cell is None or _handed_here(claim):
            kept.append(claim)
            continue
        _wrong_cell(claim, actor, batch, cell)
    return kept


def _handed_here(claim: ClaimRequested) -> bool:
    """Whether this cell's handover state keeps a claim the cell map sends
    elsewhere (slots this cell receives, or still gives): read afresh, as it
    is about to be dead-lettered otherwise."""
    res = resources()
    assert res.router is not None and res.cell is not None
    slot = res.router.phone_slot(claim.phone)
    with res.pool.connection() as conn:
        found = cells_db.handovers(conn, [slot]).get(slot)
    return found is not None and found.verdict(res.cell.name) is not cells_db.Verdict.GONE


def _wrong_cell(claim: ClaimRequested, actor: str, batch: object | None, cell: str) -> None:
    here = resources().settings.cell
    dead_letter(
        "claims",
        actor,
        "wrong_cell",
        f"claim {claim.claim_id}: its number routes to cell {cell}, this is cell {here}",
        claim.to_payload(),
        key=None if batch is None else f"{batch}:{claim.claim_id}",
    )


class HandoverPending(TransientError):
    """The claim's ring slot is being handed between cells: retried until
    the cell that decides it has the member's history."""


class HandedOver(InvalidMessage):
    """The claim's ring slot was handed to another cell."""

    def __init__(self, claim: ClaimRequested, to_cell: str) -> None:
        super().__init__("wrong_cell", f"claim {claim.claim_id}: its ring slot was handed to cell {to_cell}")
        self.to_cell = to_cell


class _SlotsTurned(Exception):
    """Some claims of a transaction must not be decided in this cell now: the
    transaction (which has done nothing else yet) is given up, and the rest
    decided without them."""

    def __init__(self, turned: dict[uuid.UUID, BaseException]) -> None:
        super().__init__(f"{len(turned)} claims turned away by a ring handover")
        self.turned = turned


def _guard(conn: Conn, claims: Sequence[ClaimRequested], slots: Sequence[int]) -> None:
    """First thing in a deciding transaction: raise _SlotsTurned for the
    claims whose ring slot is in a handover (retried) or was handed away
    (wrong_cell). The state is read under a lock that its change waits for,
    so it holds until this transaction commits."""
    here = resources().cell
    assert here is not None, "only a worker of a cell guards its transactions"
    verdicts = cells_db.slot_verdicts(conn, here.name, slots)
    if not verdicts:
        return
    found = cells_db.handovers(conn, verdicts)
    turned: dict[uuid.UUID, BaseException] = {}
    for claim, slot in zip(claims, slots, strict=True):
        verdict = verdicts.get(slot)
        if verdict is cells_db.Verdict.GONE:
            turned[claim.claim_id] = HandedOver(claim, found[slot].to_cell)
        elif verdict is cells_db.Verdict.HOLD:
            turned[claim.claim_id] = HandoverPending(
                f"claim {claim.claim_id}: ring slot {slot} is being handed from cell"
                f" {found[slot].from_cell} to {found[slot].to_cell}; retried until it is"
            )
    raise _SlotsTurned(turned)


def _prepared(claims: Sequence[ClaimRequested]) -> list[handlers.PreparedClaim]:
    """What deciding the claims needs from them alone (parsed numbers,
    payload digests), worked out in the delivery's thread while the flusher
    waits on PostgreSQL, not on the flusher's own time."""
    return handlers.prepare(resources().settings, claims).items(claims)


def _decide_claims(items: Sequence[handlers.PreparedClaim]) -> list[handlers.ClaimOutcome | BaseException]:
    """Decide a flush of claims (:func:`handlers.claims_in_turn`); each
    transaction asks for the credit of what it bound, and its outcomes are
    counted and remembered by the gate as soon as it commits. A claim a
    ring handover turns away gets its error in its place instead."""
    turned: dict[uuid.UUID, BaseException] = {}
    while True:
        todo = [item for item in items if item[0].claim_id not in turned]
        try:
            decided = iter(_decide_in_cell(todo) if todo else [])
        except _SlotsTurned as exc:
            turned.update(exc.turned)
            continue
        return [turned.get(claim.claim_id) or next(decided) for claim, _, _ in items]


def _decide_in_cell(items: Sequence[handlers.PreparedClaim]) -> list[handlers.ClaimOutcome]:
    uow, settings = unit_of_work(), resources().settings
    claims = [claim for claim, _, _ in items]
    prepared = handlers.Prepared.join(items)
    # Only a worker of a cell reads the handover state; without a cell map
    # no ring slot is worked out here (a hash per claim on the flusher).
    guarded = resources().cell is not None
    slots = [route_slot(number or claim.phone) for claim, _, number in items] if guarded else []

    def in_cell(conn: Conn, work: Callable[[Conn], handlers.Outcomes]) -> handlers.Outcomes:
        if guarded:
            _guard(conn, claims, slots)
        return _credit_later(uow, work(conn))

    def transact(work: Callable[[Conn], handlers.Outcomes]) -> handlers.Outcomes:
        outcomes = uow.run(
            lambda conn: in_cell(conn, work),
            retry_on=handlers.RETRYABLE,
            attempts=handlers.CLAIM_ATTEMPTS,
        )
        BUSY_CLAIMS.inc(sum(o is None for o in outcomes))
        return outcomes

    return handlers.claims_in_turn(transact, settings, claims, prepared=prepared, settle=_settle)


def _credit_later(uow: UnitOfWork, outcomes: handlers.Outcomes) -> handlers.Outcomes:
    """Ask for the credit of the claims bound, once the transaction commits.
    Also for duplicates: the first delivery may have died between its commit
    and this send. The credit step is idempotent."""
    bound = [o.claim_id for o in outcomes if o is not None and o.status is ClaimStatus.BOUND]
    if bound:
        uow.send_after_commit(credit_claim, CreditRequested(claim_ids=tuple(bound)))
    return outcomes


def _settle(claims: Sequence[ClaimRequested], outcomes: Sequence[handlers.ClaimOutcome]) -> None:
    _count_claims(claims, outcomes)
    granted = [(o.activity, o.group, o.digest) for o in outcomes if o.activity and o.group and o.digest]
    if granted:
        gate.remember_grants(resources().redis, granted)


def _count_claims(claims: Sequence[ClaimRequested], outcomes: Sequence[handlers.ClaimOutcome]) -> None:
    now = utcnow()
    for claim, outcome in zip(claims, outcomes, strict=True):
        if outcome.status is ClaimStatus.CONFLICT:
            dead_letter(
                "claims", "claim_requested", "ConflictingDuplicate", "claim ID reused", claim.to_payload()
            )
        elif outcome.duplicate:
            DUPLICATES.labels("claims").inc()
        else:
            CLAIMS.labels(
                ClaimStatus.REFUSED if outcome.reason else ClaimStatus.BOUND, outcome.reason or ""
            ).inc()
            CODES_BOUND.inc(len(outcome.codes))
            if outcome.status is ClaimStatus.CREDITED:
                _credited(now, claim.requested_at)


_claims: GroupCommit[handlers.PreparedClaim, handlers.ClaimOutcome] = GroupCommit(
    _decide_claims, flushers=lambda: resources().settings.claim_flushers
)


@pipeline_actor(CreditRequested)
def credit_claim(message: CreditRequested) -> str:
    """Write bound claims' coupons to the members' wallets, exactly once
    (activities that hold credits until registration keep pending members'
    back)."""
    outcome = unit_of_work().run(lambda conn: handlers.credit_requested(conn, message))
    outcome.check()
    if outcome.held:
        return "held"
    if not outcome.credited:
        DUPLICATES.labels("credits").inc()
        return "duplicate"
    now = utcnow()
    for _, promised_from in outcome.credited:
        _credited(now, promised_from)
    return "ok"


def _credited(now: datetime, promised_from: datetime) -> None:
    latency = max((now - promised_from).total_seconds(), 0)
    CLAIM_TO_CREDIT.observe(latency)
    if latency > resources().settings.credit_promise_seconds:
        PROMISE_BREACHES.inc()
    CREDITS.inc()


def _ok_or_duplicate(applied: bool, kind: str) -> str:
    """The outcome of a message applied at most once: "ok" the first time,
    "duplicate" (counted under ``kind``) for a repeat."""
    if applied:
        return "ok"
    DUPLICATES.labels(kind).inc()
    return "duplicate"


@pipeline_actor(OrderPlaced)
def order_placed(message: OrderPlaced) -> str:
    """Open the order's share (red envelope) and redeem the coupons it used."""
    if not in_this_cell(message):
        return "dead_letter"
    applied = unit_of_work().run(lambda conn: handlers.order_placed(conn, message))
    cell_referrals.announce_share(message)  # with cells: to the other cells, also after a duplicate
    return _ok_or_duplicate(applied, "orders")


@pipeline_actor(ShareOpened)
def share_opened(message: ShareOpened) -> str:
    """Record a share being opened (with cells: in its referrer's cell). An
    open of a share this cell does not know must route here by its share ID;
    one this cell knows is forwarded to its referrer's cell, or kept."""
    placed = cell_referrals.forward_share_open(message)
    if placed == "forwarded":
        return "forwarded"
    if placed == "unknown" and not in_this_cell(message):
        return "dead_letter"
    return _ok_or_duplicate(unit_of_work().run(lambda conn: handlers.share_opened(conn, message)), "shares")


@pipeline_actor(OrderStatusChanged)
def order_status_changed(message: OrderStatusChanged) -> str:
    """Pay, fulfil, cancel or refund an order: its coupons return or are
    voided; a first paid order may complete a referral and earn a rebate, a
    refund reverses it and takes back a rebate no longer earned."""
    least = resources().settings.referral_min_order_cents
    outcome = unit_of_work().run(lambda conn: lifecycle.move_order(conn, message, min_referral_cents=least))
    if outcome.outcome == "duplicate":
        DUPLICATES.labels("orders").inc()
    cell_referrals.send_referral(message)  # with cells: to the referrer's, also after a duplicate
    return outcome.outcome


@pipeline_actor(MemberRegistered)
def member_registered(message: MemberRegistered) -> str:
    """Mark a member registered and send its held credits on."""
    if not in_this_cell(message):
        return "dead_letter"
    uow, settings = unit_of_work(), resources().settings

    def register(conn: Conn) -> None:
        released = lifecycle.register_member(conn, settings, message)
        if released:
            uow.send_after_commit(credit_claim, CreditRequested(claim_ids=tuple(released)))

    uow.run(register)
    return "ok"


@pipeline_actor(ShareKnown)
def share_known(message: ShareKnown) -> str:
    """Keep another cell's share, so that claims through it here know their referrer."""
    kept = unit_of_work().run(lambda conn: cell_referrals.keep_share(conn, message))
    return _ok_or_duplicate(kept, "shares")


@pipeline_actor(ReferralCrossed)
def referral_crossed(message: ReferralCrossed) -> str:
    """Keep a referral counted (or reversed) in the referee's cell for a
    referrer of this one, and settle the referrer's rebates."""
    outcome = unit_of_work().run(lambda conn: cell_referrals.record_crossed(conn, message))
    return _ok_or_duplicate(outcome.recorded, "orders")
