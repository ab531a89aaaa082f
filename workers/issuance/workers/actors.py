"""The actors. Each one reads its message, calls one handler, and returns.

Run them with ``issuance worker`` (or ``dramatiq issuance.workers.actors``). The broker
is RabbitMQ unless ``ISSUANCE_BROKER=stub`` (the embedded demo)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import datetime

from issuance.shared import gate
from issuance.shared.db.store import Conn
from issuance.shared.domain.claims import ClaimStatus
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
    outcome = _claims.submit(_prepared([message])[0])
    return "duplicate" if outcome.duplicate else "ok"


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
    outcomes = _claims.submit_many(_prepared(claims))
    return "duplicate" if outcomes and all(o.duplicate for o in outcomes) else "ok"


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
        if cell is None:
            kept.append(claim)
            continue
        here = resources().settings.cell
        dead_letter(
            "claims",
            actor,
            "wrong_cell",
            f"claim {claim.claim_id}: its number routes to cell {cell}, this is cell {here}",
            claim.to_payload(),
            key=None if batch is None else f"{batch}:{claim.claim_id}",
        )
    return kept


def _prepared(claims: Sequence[ClaimRequested]) -> list[handlers.PreparedClaim]:
    """What deciding the claims needs from them alone (parsed numbers,
    payload digests), worked out in the delivery's thread while the flusher
    waits on PostgreSQL, not on the flusher's own time."""
    return handlers.prepare(resources().settings, claims).items(claims)


def _decide_claims(items: Sequence[handlers.PreparedClaim]) -> list[handlers.ClaimOutcome]:
    """Decide a flush of claims (:func:`handlers.claims_in_turn`); each
    transaction asks for the credit of what it bound, and its outcomes are
    counted and remembered by the gate as soon as it commits."""
    uow, settings = unit_of_work(), resources().settings
    claims = [claim for claim, _, _ in items]

    def transact(work: Callable[[Conn], handlers.Outcomes]) -> handlers.Outcomes:
        outcomes = uow.run(
            lambda conn: _credit_later(uow, work(conn)),
            retry_on=handlers.RETRYABLE,
            attempts=handlers.CLAIM_ATTEMPTS,
        )
        BUSY_CLAIMS.inc(sum(o is None for o in outcomes))
        return outcomes

    return handlers.claims_in_turn(
        transact, settings, claims, prepared=handlers.Prepared.join(items), settle=_settle
    )


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
