"""The promise's safety net: claims bound but not credited after a grace
period get their credit message sent again, and claims accepted but never
recorded get their claim message sent again.

Re-sending a credit is idempotent twice over: the credit message carries the
same stable message ID as the first one (issuance.shared.wire.codec), and
the credit handler writes each wallet entry at most once.

A claim message is acknowledged only after its decision commits, but its
queue copy can still be lost before any worker took it (a purge, a policy,
a broker losing a classic queue). The acceptance ledger
(issuance.shared.db.ledger) still holds the envelope: an entry older than
the grace period with neither a ``claims`` row nor a dead letter is
re-published to the ``claims`` queue byte for byte (not into the ledger
again), and the claim handler, idempotent by claim ID, absorbs the copy
if the original turns up after all.

Each claim or envelope is re-sent at most once per grace period (a Redis
key each), so a stopped step does not make the sweeper flood its queue.
While the ``claims`` queue holds a backlog, an unrecorded claim may only be
waiting in it: it is re-sent once it is BACKLOG_PATIENCE grace periods old.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

import dramatiq
import pika.exceptions
import psycopg
import redis
from issuance.shared.db import ledger
from issuance.shared.db.analytics import PromiseSnapshot, bound_not_credited, promise_snapshot
from issuance.shared.errors import PublishError
from issuance.shared.settings import Settings
from issuance.shared.wire import amqp
from issuance.shared.wire.codec import LEDGER_ROUTE
from issuance.shared.wire.ledger import Entry, LedgerAbsent
from issuance.shared.wire.messages import CreditRequested, utcnow
from issuance.shared.wire.publisher import Publisher, RabbitPublisher

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_GRACE = timedelta(minutes=10)
INTERVAL_SECONDS = 30.0
# One summary line this often: 288 lines a day, not one per pass.
SUMMARY_SECONDS = 300.0
RESENT_KEY = "issuance:sweeper:resent:{}"
REDRIVEN_KEY = "issuance:sweeper:redriven:{}"
# Grace periods a claim may wait in a backlog of its queue before it is re-sent anyway.
BACKLOG_PATIENCE = 4


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SweepResult:
    found: int
    requeued: int
    promise: PromiseSnapshot
    # Ledger entries accepted and not recorded, and how many were re-published.
    unrecorded: int = 0
    redriven: int = 0


def sweep(
    settings: Settings,
    *,
    now: datetime | None = None,
    grace: timedelta = DEFAULT_GRACE,
    limit: int = 5000,
    publisher: Publisher | None = None,
    cache: redis.Redis | None = None,
) -> SweepResult:
    """One pass: find claims bound ``grace`` ago or earlier and not credited,
    re-send their credit messages (oldest deadline first); find claims
    accepted ``grace`` ago or earlier and never recorded, re-send their claim
    messages from the ledger; return what was found with the promise as it
    stands at ``now``."""
    now = now or utcnow()
    with psycopg.connect(settings.database_url) as conn:
        overdue = bound_not_credited(conn, now=now, grace=grace, limit=limit)
        promise = promise_snapshot(conn, now)
        lost = _unrecorded(conn, settings, grace, limit)
    ttl = max(int(grace.total_seconds()), 1)
    own_cache = cache is None
    cache = cache or redis.Redis.from_url(settings.redis_url, socket_timeout=2)
    try:
        due = _not_recently_resent(cache, overdue, ttl, RESENT_KEY, str)
        lost_now = due_for_redrive(lost.entries, _queued_claims(settings) if lost.entries else 0, grace)
        redrive = _not_recently_resent(cache, lost_now, ttl, REDRIVEN_KEY, lambda e: e.message_id)
    finally:
        if own_cache:
            cache.close()
    if due or redrive:
        own_publisher = publisher is None
        # Re-sent claims go to their queue only: the ledger has them already.
        publisher = publisher or RabbitPublisher.from_settings(settings, ledger=False)
        try:
            _resend(publisher, due, redrive)
        finally:
            if own_publisher:
                publisher.close()
    if overdue:
        log.warning(
            "%d claims bound and not credited after %s; re-sent %d credit messages",
            len(overdue),
            grace,
            len(due),
        )
    if lost.unsettled:
        log.warning(
            "%d accepted claim messages not recorded after %s (ledger offsets %s..); re-sent %d",
            lost.unsettled,
            grace,
            lost.checkpoint,
            len(redrive),
        )
    return SweepResult(
        found=len(overdue),
        requeued=len(due),
        promise=promise,
        unrecorded=lost.unsettled,
        redriven=len(redrive),
    )


def due_for_redrive(
    entries: Sequence[Entry], backlog: int, grace: timedelta, now_ms: int | None = None
) -> list[Entry]:
    """The unrecorded entries to re-publish now. While the ``claims`` queue
    holds a ``backlog``, an entry past the grace may simply be waiting in
    it: only those older than BACKLOG_PATIENCE grace periods are re-sent
    then, so a backlog is not doubled and a lost claim still comes back."""
    if not backlog:
        return list(entries)
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    oldest = now_ms - BACKLOG_PATIENCE * int(grace.total_seconds() * 1000)
    return [e for e in entries if e.accepted_ms < oldest]


def _queued_claims(settings: Settings) -> int:
    """How many messages wait in the ``claims`` queue (0 when there is none)."""
    connection = amqp.connect(settings.amqp_url)
    try:
        return int(connection.channel().queue_declare(LEDGER_ROUTE, passive=True).method.message_count)
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        if connection.is_open:
            connection.close()


def _unrecorded(conn: Any, settings: Settings, grace: timedelta, limit: int) -> ledger.Reconciliation:
    """The ledger's entries past ``grace`` not recorded (none without a ledger)."""
    try:
        return ledger.reconcile(conn, settings.amqp_url, grace=grace, keep=limit)
    except LedgerAbsent as exc:
        return ledger.Reconciliation(absent=str(exc))


def _resend(publisher: Publisher, credits: list[uuid.UUID], entries: list[Entry]) -> None:
    from issuance.workers.instruments import SWEEPER_REDRIVEN, SWEEPER_REQUEUED

    if entries:
        publisher.publish_encoded(e.item() for e in entries)
        SWEEPER_REDRIVEN.inc(len(entries))
    if credits:
        publisher.publish_many(credit_messages(credits))
        SWEEPER_REQUEUED.inc(len(credits))


def credit_messages(claim_ids: Sequence[uuid.UUID], batch: int = 500) -> Iterator[CreditRequested]:
    """The credit messages for ``claim_ids``: one per claim, or batches of
    claims where the message carries a list."""
    if "claim_ids" in CreditRequested.FIELDS:
        for start in range(0, len(claim_ids), batch):
            chunk = [str(c) for c in claim_ids[start : start + batch]]
            yield CreditRequested.from_payload({"v": CreditRequested.VERSION, "claim_ids": chunk})
    else:
        for claim_id in claim_ids:
            yield CreditRequested.from_payload({"v": CreditRequested.VERSION, "claim_id": str(claim_id)})


def _not_recently_resent(
    cache: redis.Redis, items: Sequence[T], ttl: int, key: str, name: Callable[[T], str]
) -> list[T]:
    """The items not re-sent within ``ttl`` seconds (``key`` formatted with
    each one's ``name``); marks them as re-sent. Without Redis every one is
    re-sent (duplicates are harmless)."""
    if not items:
        return []
    try:
        pipe = cache.pipeline(transaction=False)
        for item in items:
            pipe.set(key.format(name(item)), b"1", nx=True, ex=ttl)
        fresh = pipe.execute()
    except redis.RedisError as exc:
        log.warning("Redis unavailable (%s): re-sending everything overdue", exc)
        return list(items)
    return [item for item, was_set in zip(items, fresh, strict=True) if was_set]


def run_sweeper(
    settings: Settings,
    *,
    interval: float,
    grace: timedelta,
    passes: int | None = None,
    summary_seconds: float = SUMMARY_SECONDS,
) -> None:
    """Sweep every ``interval`` seconds (``passes`` times, or until stopped),
    with one summary line every ``summary_seconds`` and when it stops. A
    pass that finds claims says so at once (a warning, from :func:`sweep`)."""
    log.info("sweeper: a pass every %.0fs, re-sending credits after %s", interval, grace)
    tally = _Tally()
    done = 0
    try:
        while passes is None or done < passes:
            started = time.monotonic()
            try:
                tally.add(sweep(settings, grace=grace))
            except (psycopg.Error, redis.RedisError, PublishError, pika.exceptions.AMQPError, OSError) as exc:
                tally.failed += 1
                log.error("sweep failed: %s; trying again in %.0fs", exc, interval)
            done += 1
            if time.monotonic() - tally.since >= summary_seconds:
                tally = tally.report()
            if passes is None or done < passes:
                time.sleep(max(interval - (time.monotonic() - started), 0))
    finally:
        tally.report()


@dataclasses.dataclass(slots=True)
class _Tally:
    """What the passes since the last summary line found."""

    since: float = dataclasses.field(default_factory=time.monotonic)
    passes: int = 0
    failed: int = 0
    found: int = 0
    requeued: int = 0
    unrecorded: int = 0
    redriven: int = 0
    last: SweepResult | None = None

    def add(self, result: SweepResult) -> None:
        self.passes += 1
        self.found += result.found
        self.requeued += result.requeued
        self.unrecorded += result.unrecorded
        self.redriven += result.redriven
        self.last = result

    def report(self) -> _Tally:
        """Log the summary line; a fresh tally for the next one."""
        if self.passes or self.failed:
            promise = self.last.promise if self.last else None
            log.info(
                "sweeper: %d passes in %.0fs (%d failed), %d overdue found, %d credits re-sent,"
                " %d accepted claims unrecorded, %d re-sent; now %s uncredited, oldest %.0fs",
                self.passes,
                time.monotonic() - self.since,
                self.failed,
                self.found,
                self.requeued,
                self.unrecorded,
                self.redriven,
                promise.uncredited if promise else "?",
                promise.oldest_age_seconds if promise else 0,
            )
        return _Tally()


def default_grace(settings: Settings) -> timedelta:
    """Half the grace after which ``issuance verify`` calls a bound claim
    stuck: a lost credit is re-sent before verify reports it."""
    return timedelta(seconds=settings.reconcile_grace_seconds / 2)


def sweep_forever() -> int:
    """The sweeper as a fork of ``issuance worker``; never returns."""
    from issuance.workers.process import boot_fork

    settings = boot_fork("sweeper")
    while True:
        try:
            run_sweeper(settings, interval=INTERVAL_SECONDS, grace=default_grace(settings))
        except Exception:
            # Dramatiq does not restart a fork that exits: this one does not exit.
            log.exception("the sweeper failed unexpectedly; starting it again")
            time.sleep(INTERVAL_SECONDS)


class SweeperFork(dramatiq.Middleware):
    """Wherever workers run, the sweeper runs: Dramatiq's CLI (``issuance
    worker``) starts :func:`sweep_forever` as a fork process next to them.
    More than one sweeper is harmless (a Redis key per claim and grace
    period, and crediting is idempotent)."""

    @property
    def forks(self) -> list[Any]:
        return [sweep_forever]
