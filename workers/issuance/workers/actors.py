"""The actors. Each one reads its message, calls one handler, and returns.

Run them with ``issuance worker`` (or ``dramatiq issuance.workers.actors``). The broker
is RabbitMQ unless ``ISSUANCE_BROKER=stub`` (the embedded demo)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime

from issuance.shared import gate
from issuance.shared.faults import crash_point
from issuance.shared.metrics import (
    CLAIM_TO_CREDIT,
    CLAIMS,
    CODES_BOUND,
    CREDITS,
    DUPLICATES,
    PROMISE_BREACHES,
)
from issuance.shared.settings import load_settings
from issuance.shared.wire.messages import (
    ClaimRequested,
    ClaimsRequested,
    CreditRequested,
    MemberRegistered,
    OrderPlaced,
    OrderStatusChanged,
    ShareOpened,
    utcnow,
)
from issuance.workers import handlers, lifecycle
from issuance.workers.batching import GroupCommit
from issuance.workers.broker import build_broker
from issuance.workers.runtime import dead_letter, pipeline_actor, resources, send

broker = build_broker(load_settings(), kind=os.environ.get("ISSUANCE_BROKER", "rabbitmq"))


@pipeline_actor(ClaimRequested)
def claim_requested(message: ClaimRequested) -> str:
    """Decide one claim: refuse it, or bind its codes and credit them (or hand
    it to the credit step). Concurrent deliveries in this process share one
    transaction."""
    outcome = _claims.submit(message)
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
    outcomes = _claims.submit_many(message.valid)
    return "duplicate" if outcomes and all(o.duplicate for o in outcomes) else "ok"


def _decide_claims(claims: Sequence[ClaimRequested]) -> list[handlers.ClaimOutcome]:
    res = resources()
    outcomes = handlers.handle_claims(res.pool, res.settings, claims)
    now = utcnow()
    for claim, outcome in zip(claims, outcomes, strict=True):
        if outcome.status == "conflict":
            dead_letter(
                "claims", "claim_requested", "ConflictingDuplicate", "claim ID reused", claim.to_payload()
            )
        elif outcome.duplicate:
            DUPLICATES.labels("claims").inc()
        else:
            CLAIMS.labels("refused" if outcome.reason else "bound", outcome.reason or "").inc()
            CODES_BOUND.inc(len(outcome.codes))
            if outcome.status == "credited":
                _credited(now, claim.requested_at)
    # Also for duplicates: the first delivery may have died between its commit
    # and this publish. The credit step is idempotent.
    bound = [o.claim_id for o in outcomes if o.status == "bound"]
    if bound:
        crash_point(res.settings, "after_commit_before_publish")
        send(credit_claim, CreditRequested(claim_ids=tuple(bound)))
    granted = [(o.activity, o.group, o.digest) for o in outcomes if o.activity and o.group and o.digest]
    if granted:
        gate.remember_grants(res.redis, granted)
    return outcomes


_claims: GroupCommit[ClaimRequested, handlers.ClaimOutcome] = GroupCommit(_decide_claims)


@pipeline_actor(CreditRequested)
def credit_claim(message: CreditRequested) -> str:
    """Write bound claims' coupons to the members' wallets, exactly once."""
    # Activities that hold credits until registration keep pending members' back.
    plan = lifecycle.prepare_credit(resources().pool, message.claim_ids)
    if not plan.ready:
        return "held"
    if len(plan.ready) < len(message.claim_ids):
        message = CreditRequested(claim_ids=tuple(plan.ready))
    credited = handlers.handle_credit(resources().pool, message)
    if not credited:
        DUPLICATES.labels("credits").inc()
        return "duplicate"
    now = utcnow()
    for claim_id, requested_at in credited:
        # A credit held until registration is promised from registration.
        _credited(now, plan.promise_from.get(claim_id, requested_at))
    return "ok"


def _credited(now: datetime, promised_from: datetime) -> None:
    latency = max((now - promised_from).total_seconds(), 0)
    CLAIM_TO_CREDIT.observe(latency)
    if latency > resources().settings.credit_promise_seconds:
        PROMISE_BREACHES.inc()
    CREDITS.inc()


@pipeline_actor(OrderPlaced)
def order_placed(message: OrderPlaced) -> str:
    """Open the order's share (red envelope) and redeem the coupons it used."""
    opened = handlers.handle_order_placed(resources().pool, message)
    if lifecycle.record_order(resources().pool, message).recorded or opened:
        return "ok"
    DUPLICATES.labels("orders").inc()
    return "duplicate"


@pipeline_actor(ShareOpened)
def share_opened(message: ShareOpened) -> str:
    """Record a share being opened."""
    if handlers.handle_share_opened(resources().pool, message):
        return "ok"
    DUPLICATES.labels("shares").inc()
    return "duplicate"


@pipeline_actor(OrderStatusChanged)
def order_status_changed(message: OrderStatusChanged) -> str:
    """Pay, cancel or refund an order: coupons return on a cancellation before
    payment; a first paid order may complete a referral and earn a rebate."""
    outcome = lifecycle.handle_order_status(resources().pool, message)
    if outcome.outcome == "duplicate":
        DUPLICATES.labels("orders").inc()
    return outcome.outcome


@pipeline_actor(MemberRegistered)
def member_registered(message: MemberRegistered) -> str:
    """Mark a member registered and send its held credits on."""
    res = resources()
    released = lifecycle.handle_member_registered(res.pool, res.settings, message)
    if released:
        send(credit_claim, CreditRequested(claim_ids=tuple(released)))
    return "ok"
