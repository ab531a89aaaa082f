"""The actors. Each one reads its message, calls one handler, and returns.

Run them with ``issuance worker`` (or ``dramatiq workers.actors``). The broker
is RabbitMQ unless ``ISSUANCE_BROKER=stub`` (the embedded demo)."""

from __future__ import annotations

import os

from shared import gate
from shared.faults import crash_point
from shared.messages import ClaimRequested, CreditRequested, OrderPlaced, ShareOpened, utcnow
from shared.metrics import CLAIM_TO_CREDIT, CLAIMS, CODES_BOUND, CREDITS, DUPLICATES, PROMISE_BREACHES
from shared.settings import load_settings
from workers import handlers
from workers.broker import build_broker
from workers.runtime import pipeline_actor, resources, send

broker = build_broker(load_settings(), kind=os.environ.get("ISSUANCE_BROKER", "rabbitmq"))


@pipeline_actor(ClaimRequested)
def claim_requested(message: ClaimRequested) -> str:
    """Decide a claim and, once its codes are bound, hand it to the credit step."""
    res = resources()
    outcome = handlers.handle_claim(res.pool, res.settings, message)
    if outcome.duplicate:
        DUPLICATES.labels("claims").inc()
    else:
        CLAIMS.labels(outcome.status, outcome.reason or "").inc()
        CODES_BOUND.inc(len(outcome.codes))
    if outcome.status == "bound":
        # Also on a duplicate: the first delivery may have died between its
        # commit and this publish.
        crash_point(res.settings, "after_commit_before_publish")
        send(credit_claim, CreditRequested(claim_id=message.claim_id))
    if outcome.digest is not None and outcome.activity and outcome.group:
        gate.remember_grant(res.redis, activity=outcome.activity, group=outcome.group, digest=outcome.digest)
    return "duplicate" if outcome.duplicate else "ok"


@pipeline_actor(CreditRequested)
def credit_claim(message: CreditRequested) -> str:
    """Write a bound claim's coupons to the member's wallet, exactly once."""
    written, requested_at = handlers.handle_credit(resources().pool, message)
    if requested_at is None:
        DUPLICATES.labels("credits").inc()
        return "duplicate"
    CREDITS.inc(written)
    latency = max((utcnow() - requested_at).total_seconds(), 0)
    CLAIM_TO_CREDIT.observe(latency)
    if latency > resources().settings.credit_promise_seconds:
        PROMISE_BREACHES.inc()
    return "ok"


@pipeline_actor(OrderPlaced)
def order_placed(message: OrderPlaced) -> str:
    """Open the order's share (red envelope)."""
    if handlers.handle_order_placed(resources().pool, message):
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
