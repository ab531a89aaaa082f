"""Metric definitions, shared by every process.

Prometheus conventions: base units, ``_total`` on counters, bounded labels
(queue, actor, outcome, reason, activity): never a member, phone or code.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

MESSAGES = Counter(
    "issuance_messages_total",
    "Messages handled, by queue, actor and outcome (ok, duplicate, dead_letter, retry).",
    ["queue", "actor", "outcome"],
)
CLAIMS = Counter(
    "issuance_claims_total",
    "Claims decided, by outcome (bound, refused) and refusal reason.",
    ["outcome", "reason"],
)
CODES_BOUND = Counter("issuance_codes_bound_total", "Codes bound to members.")
CREDITS = Counter("issuance_credits_total", "Wallet entries written.")
DEAD_LETTERS = Counter(
    "issuance_dead_letters_total", "Messages dead-lettered, by queue and reason.", ["queue", "reason"]
)
DUPLICATES = Counter(
    "issuance_duplicates_suppressed_total",
    "Deliveries that changed nothing because their effect was already recorded.",
    ["queue"],
)
CLAIM_TO_CREDIT = Histogram(
    "issuance_claim_to_credit_seconds",
    "From the claim's request to its wallet credit.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 6 * 3600, 12 * 3600, 86_400),
)
QUEUE_WAIT = Histogram(
    "issuance_queue_wait_seconds",
    "From a message's enqueue to the start of its handling.",
    ["queue"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60, 300, 3600, 86_400),
)
