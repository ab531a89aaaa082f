"""The workers' metrics: messages, claims, credits, the promise, the
consumers. Defined here, beside the code that moves them, so that no other
process (the page, the back office) exports them at 0; exposed across worker
processes by :mod:`issuance.shared.metrics`' multi-process machinery."""

from __future__ import annotations

from issuance.shared.metrics import names_of
from prometheus_client import Counter, Gauge, Histogram

# Seconds, up to and around the 24-hour promise: the interesting part of the
# distribution under a flood is hours 1 to 24, and past it.
PROMISE_BUCKETS = (
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    900,
    1800,
    3600,
    2 * 3600,
    4 * 3600,
    6 * 3600,
    12 * 3600,
    18 * 3600,
    20 * 3600,
    22 * 3600,
    23 * 3600,
    86_400,
    26 * 3600,
    48 * 3600,
)

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
CREDITS = Counter(
    "issuance_credits_total", "Claims credited: packages written to members' wallets (once per claim)."
)
DEAD_LETTERS = Counter(
    "issuance_dead_letters_total", "Messages dead-lettered, by queue and reason.", ["queue", "reason"]
)
DUPLICATES = Counter(
    "issuance_duplicates_suppressed_total",
    "Deliveries that changed nothing because their effect was already recorded.",
    ["queue"],
)
BUSY_CLAIMS = Counter(
    "issuance_claims_deferred_total",
    "Claims of a flush that a concurrent transaction was deciding,"
    " decided after it in a transaction of their own.",
)
CLAIM_TO_CREDIT = Histogram(
    "issuance_claim_to_credit_seconds",
    "From the claim's request to its wallet credit.",
    buckets=PROMISE_BUCKETS,
)
PROMISE_BREACHES = Counter(
    "issuance_promise_breaches_total",
    "Claims credited after their deadline (the 24-hour promise was broken).",
)
QUEUE_WAIT = Histogram(
    "issuance_queue_wait_seconds",
    "From a message's enqueue to the start of its handling.",
    ["queue"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60, 300, 900, 3600, 6 * 3600, 86_400),
)
MESSAGE_DURATION = Histogram(
    "issuance_message_duration_seconds",
    "Time spent handling one delivery, by queue and actor (failed attempts included).",
    ["queue", "actor"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
MESSAGE_ERRORS = Counter(
    "issuance_message_errors_total",
    "Deliveries whose handling raised (each is retried or dead-lettered), by queue and actor.",
    ["queue", "actor"],
)
IN_PROGRESS = Gauge(
    "issuance_messages_in_progress",
    "Messages being handled right now, by queue and actor.",
    ["queue", "actor"],
    multiprocess_mode="livesum",
)
CONSUMERS = Gauge(
    "issuance_worker_consumers",
    "Worker processes consuming each queue (live processes only).",
    ["queue"],
    multiprocess_mode="livesum",
)
WORKER_THREADS = Gauge(
    "issuance_worker_threads",
    "Worker threads of the live worker processes.",
    multiprocess_mode="livesum",
)
SWEEPER_REQUEUED = Counter(
    "issuance_sweeper_requeued_total",
    "Credit messages re-sent by the sweeper for claims bound but not credited after the grace period.",
)
SWEEPER_REDRIVEN = Counter(
    "issuance_sweeper_redriven_total",
    "Claim envelopes re-published from the acceptance ledger: accepted, unrecorded after the grace period.",
)


def exported_names() -> set[str]:
    """Every sample name the workers' metrics can produce, for checking rules
    and dashboards."""
    return names_of(
        MESSAGES,
        CLAIMS,
        CODES_BOUND,
        CREDITS,
        DEAD_LETTERS,
        DUPLICATES,
        CLAIM_TO_CREDIT,
        PROMISE_BREACHES,
        QUEUE_WAIT,
        MESSAGE_DURATION,
        MESSAGE_ERRORS,
        IN_PROGRESS,
        CONSUMERS,
        WORKER_THREADS,
        SWEEPER_REQUEUED,
        SWEEPER_REDRIVEN,
    )
