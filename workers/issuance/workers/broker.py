"""Broker set-up: RabbitMQ in production, Dramatiq's in-process stub for the
embedded demo and unit tests. Both use the project's orjson codec and the
same middleware."""

from __future__ import annotations

import dramatiq
import psycopg
import psycopg_pool
import redis
from dramatiq.broker import Broker
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import AgeLimit, CurrentMessage, ShutdownNotifications, TimeLimit
from issuance.shared.errors import TransientError
from issuance.shared.settings import PhoneKeyError, Settings
from issuance.shared.wire.codec import OrjsonEncoder
from issuance.workers.delivery import ConfirmedRetries, GuardedRabbitmqBroker
from issuance.workers.metrics import WorkerMetrics
from issuance.workers.process import ProcessBoot
from issuance.workers.quorum import QueueTypeRabbitmqBroker
from issuance.workers.signing import Signing
from issuance.workers.startup import PhoneKeyCheck
from issuance.workers.sweeper import SweeperFork

# A handler that takes longer than this is stuck (a lock held by a dead
# session, say); the time limit turns it into a retry.
TIME_LIMIT_MS = 60_000


def middleware(settings: Settings) -> list[dramatiq.Middleware]:
    """The middleware of every broker. Not Dramatiq's Pipelines or Callbacks:
    the project sends follow-up messages itself, and those two would have a
    worker build, sign and send whatever a message's options describe."""
    return [
        # First: a forged or unsigned message is refused before anything else runs.
        Signing(),
        PhoneKeyCheck(),
        ProcessBoot(),
        AgeLimit(),
        TimeLimit(time_limit=TIME_LIMIT_MS),
        ShutdownNotifications(),
        CurrentMessage(),
        WorkerMetrics(),
        SweeperFork(),
        # The backoff is capped so that a message retried through a long
        # outage is handled soon after it ends, well inside the credit promise
        # (Dramatiq's default backoff grows to 7 days).
        # A retry copy the broker does not confirm hands the delivery back (issuance.workers.delivery).
        ConfirmedRetries(
            min_backoff=settings.min_backoff_ms,
            max_backoff=settings.max_backoff_ms,
            retry_when=RetryPolicy(settings.max_retries),
        ),
    ]


# An unavailable dependency is waited out, however long it takes, and so is a
# phone key that does not match the database's (the worker holds its messages
# until an operator gives it the right key); any other failure, such as a
# message signed with a key this worker does not know, is retried a bounded
# number of times and then dead-lettered (see issuance.shared.db.dead_letters).
OUTAGES = (psycopg.OperationalError, psycopg_pool.PoolTimeout, redis.ConnectionError, redis.TimeoutError)


class RetryPolicy:
    def __init__(self, max_retries: int) -> None:
        self.max_retries = max_retries

    def __call__(self, retries: int, exception: BaseException) -> bool:
        return isinstance(exception, (*OUTAGES, TransientError, PhoneKeyError)) or retries < self.max_retries


class IssuanceBroker(GuardedRabbitmqBroker, QueueTypeRabbitmqBroker):
    """The workers' RabbitMQ broker: queues of the configured type on the
    first live node of the URL list (QueueTypeRabbitmqBroker), deliveries
    settled only by the consumer they came from (GuardedRabbitmqBroker)."""


def build_broker(settings: Settings, *, kind: str = "rabbitmq") -> Broker:
    """Create the broker and make it (and the codec) Dramatiq's global ones."""
    dramatiq.set_encoder(OrjsonEncoder())
    broker: Broker
    if kind == "stub":
        broker = StubBroker(middleware=middleware(settings))
        broker.emit_after("process_boot")
    elif kind == "rabbitmq":
        # confirm_delivery: a follow-up message (credit) counts as sent only
        # once RabbitMQ has confirmed it.
        broker = IssuanceBroker(
            urls=settings.amqp_url,
            queue_type=settings.queue_type,
            confirm_delivery=True,
            middleware=middleware(settings),
        )
    else:
        raise ValueError(f"unknown broker kind {kind!r}")
    dramatiq.set_broker(broker)
    return broker
