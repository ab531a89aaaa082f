"""Dead letters and logs keep no phone number in clear, batches included."""

from __future__ import annotations

import orjson
from issuance.shared.wire.messages import ClaimRequested, ClaimsRequested
from issuance.workers.runtime import redact


def test_a_batch_dead_letter_masks_every_claim_number():
    batch = dict(ClaimsRequested.EXAMPLE)
    batch["claims"] = [
        {**ClaimRequested.EXAMPLE, "phone": "+8613912345678"},
        {**ClaimRequested.EXAMPLE, "phone": "13987654321"},
        "not even a claim",
    ]
    text = orjson.dumps(redact(batch)).decode()
    assert "13912345678" not in text and "13987654321" not in text
    assert "not even a claim" in text  # the rest of the body is kept for the operator


def test_a_single_claim_is_masked_and_other_payloads_pass_through():
    assert "8000" not in redact({**ClaimRequested.EXAMPLE})["phone"][4:-2]
    assert redact([1, 2]) == [1, 2]
    assert redact({"order_id": "SO-1"}) == {"order_id": "SO-1"}
