"""The reference: what a team would write first. One Dramatiq actor, one
claim per message, one transaction per claim (which binds and credits it).

It runs the pipeline's own claim SQL (so the comparison is about batching,
not about the SQL) on a queue of its own:

    dramatiq issuance.workers.actors benchmarks.reference_actor --queues reference credits
"""

from __future__ import annotations

from typing import Any

import dramatiq
from issuance.shared.wire.messages import ClaimRequested, CreditRequested
from issuance.workers import actors, handlers
from issuance.workers.runtime import resources, send

QUEUE = "reference"


@dramatiq.actor(queue_name=QUEUE, actor_name="reference_claim")
def reference_claim(payload: Any) -> None:
    claim = ClaimRequested.from_payload(payload)
    res = resources()
    (outcome,) = handlers.handle_claims(res.pool, res.settings, [claim])
    if outcome.status == "bound":
        send(actors.credit_claim, CreditRequested(claim_ids=(claim.claim_id,)))
