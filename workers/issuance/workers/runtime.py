"""What every actor shares: process-wide resources created after fork, the
unit of work that runs a message's transaction, and the wrapper that turns a
handler into a Dramatiq actor.

The wrapper decodes the payload with the codec, sends anything unusable to
the dead-letter store with its reason (and acknowledges it: no poison loop),
counts outcomes, and lets transient failures propagate so that Dramatiq
retries them with the bounded backoff of issuance.workers.broker.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import dramatiq
import orjson
import redis
from dramatiq.middleware import CurrentMessage
from issuance.shared.cellmap import home_cell, load_cell_map
from issuance.shared.db import database, fingerprints, store
from issuance.shared.db.store import Conn
from issuance.shared.domain import redact_payload as redact
from issuance.shared.domain.cells import CellMapError
from issuance.shared.errors import InvalidMessage, PermanentError, TransientError
from issuance.shared.faults import crash_point
from issuance.shared.settings import Settings, load_settings, require_phone_key
from issuance.shared.wire.cells import CellRouter, RoutingError
from issuance.shared.wire.codec import ROUTES
from issuance.shared.wire.messages import Message
from issuance.workers.instruments import DEAD_LETTERS, MESSAGES, QUEUE_WAIT
from psycopg_pool import ConnectionPool

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)
R = TypeVar("R")


class Resources:
    """Connections of one worker process, opened on first use (after
    Dramatiq has forked) and shared by its threads."""

    def __init__(self, settings: Settings) -> None:
        require_phone_key(settings)
        self.settings = settings
        # The cell this worker serves (ISSUANCE_CELL) and the map's routing.
        self.cell = home_cell(settings)
        self.router = CellRouter(load_cell_map(settings), settings.default_region) if self.cell else None
        self._lock = threading.Lock()
        self._pool: ConnectionPool | None = None
        self._redis: redis.Redis | None = None

    @property
    def pool(self) -> ConnectionPool:
        with self._lock:
            if self._pool is None:
                pool = database.pool(self.settings, max_size=max(self.settings.worker_threads, 2))
                try:
                    with pool.connection() as conn:
                        fingerprints.check_phone_key(conn, self.settings)
                except BaseException:
                    pool.close()
                    raise
                self._pool = pool
            return self._pool

    @property
    def redis(self) -> redis.Redis:
        with self._lock:
            if self._redis is None:
                self._redis = redis.Redis.from_url(
                    self.settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5
                )
            return self._redis

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None
            if self._redis is not None:
                self._redis.close()
                self._redis = None


_resources: Resources | None = None


def resources() -> Resources:
    global _resources  # noqa: PLW0603 - one set of connections per process
    if _resources is None:
        _resources = Resources(load_settings())
    return _resources


def use_resources(value: Resources) -> None:
    """Replace the process's resources (the embedded demo and tests)."""
    global _resources  # noqa: PLW0603 - one set of connections per process
    if _resources is not None and _resources is not value:
        _resources.close()
    _resources = value


class UnitOfWork:
    """The transaction of one message, and the messages it leads to.

    ``run`` calls the work with a connection inside one transaction (again,
    in a fresh one, after an error named in ``retry_on``); the work asks for
    follow-up messages with ``send_after_commit``. They leave only once the
    transaction has committed, and not at all when it rolled back: a message
    is never sent about a change that did not happen. A crash between the
    commit and the sending is covered by redelivery (the handlers are
    idempotent and derive the follow-ups again).
    """

    def __init__(self, pool: ConnectionPool, settings: Settings | None = None) -> None:
        self.pool = pool
        self.settings = settings
        self._follow_ups: list[tuple[dramatiq.Actor[Any, Any], Message]] = []

    def send_after_commit(self, actor: dramatiq.Actor[Any, Any], message: Message) -> None:
        self._follow_ups.append((actor, message))

    def run(
        self,
        work: Callable[[Conn], R],
        *,
        retry_on: tuple[type[Exception], ...] = (),
        attempts: int = 1,
    ) -> R:
        for attempt in range(1, attempts + 1):
            self._follow_ups.clear()
            try:
                with self.pool.connection() as conn, conn.transaction():
                    result = work(conn)
            except retry_on as exc:
                log.info("transaction retried (%s), attempt %d of %d", type(exc).__name__, attempt, attempts)
                continue
            self._send_follow_ups()
            return result
        raise TransientError(f"a transaction kept colliding with concurrent ones ({attempts} attempts)")

    def _send_follow_ups(self) -> None:
        follow_ups, self._follow_ups = self._follow_ups, []
        if follow_ups and self.settings is not None:
            crash_point(self.settings, "after_commit_before_publish")
        for actor, message in follow_ups:
            send(actor, message)


def unit_of_work() -> UnitOfWork:
    """A unit of work on this process's connections."""
    res = resources()
    return UnitOfWork(res.pool, res.settings)


def dead_letter(
    queue: str, actor: str, reason: str, detail: str, payload: Any, *, key: str | None = None
) -> None:
    """Keep an unusable message in PostgreSQL with the reason it was refused
    (once per message key and reason: a re-delivery stores nothing new)."""
    current = CurrentMessage.get_current_message()
    body = orjson.dumps(redact(payload), default=str).decode()
    if key is None:
        key = current.message_id if current is not None else hashlib.sha256(body.encode()).hexdigest()
    with resources().pool.connection() as conn, conn.transaction():
        stored = store.insert_dead_letter(
            conn, message_key=key, queue=queue, actor=actor, reason=reason, detail=detail, body=body
        )
    if stored:
        DEAD_LETTERS.labels(queue, reason).inc()
    log.warning("dead-lettered a %s message %s: %s (%s)", actor, key, reason, detail)


def routed_elsewhere(phone: str) -> str | None:
    """The cell a claim's number routes to when that is not this worker's
    cell (``ISSUANCE_CELL``); None when it is, or when no cell is set."""
    res = resources()
    if res.router is None or res.cell is None:
        return None
    cell = res.router.phone_cell(phone)
    return None if cell == res.cell.name else cell


def _member_elsewhere(message: Message) -> str | None:
    """Where a message of a member routes, when not to this worker's cell."""
    res = resources()
    if res.router is None or res.cell is None:
        return None
    try:
        cell = res.router.cell_of(message)
    except RoutingError:
        # It names no member (an order's status change, an order naming an
        # app member ID): publish_for_member placed it; nothing to check.
        return None
    except CellMapError as exc:
        return str(exc)
    return None if cell == res.cell.name else f"it routes to cell {cell}"


def in_this_cell(message: Message) -> bool:
    """Whether a message routed by its member (member ID, a registration's
    number, a share open's ID) belongs to this worker's cell
    (``ISSUANCE_CELL``). One that does not is dead-lettered (``wrong_cell``),
    not applied: as for claims (see ``routed_elsewhere``), a producer with
    another map must not split a member's records over two cells."""
    where = _member_elsewhere(message)
    if where is None:
        return True
    route = ROUTES[message.TYPE]
    dead_letter(
        route.queue,
        route.actor,
        "wrong_cell",
        f"{message.TYPE} {message.business_key()}: {where}, this is cell {resources().settings.cell}",
        message.to_payload(),
    )
    return False


def pipeline_actor(message_type: type[M]) -> Callable[[Callable[[M], str]], dramatiq.Actor[Any, Any]]:
    """Declare the actor for a message type around a handler that returns its
    outcome label ("ok", "duplicate", ...)."""
    route = ROUTES[message_type.TYPE]

    def decorate(handle: Callable[[M], str]) -> dramatiq.Actor[Any, Any]:
        def consume(payload: Any) -> None:
            current = CurrentMessage.get_current_message()
            if current is not None:
                QUEUE_WAIT.labels(route.queue).observe(max(time.time() - current.message_timestamp / 1000, 0))
            try:
                message = message_type.from_payload(payload)
                outcome = handle(message)
            except InvalidMessage as exc:
                dead_letter(route.queue, route.actor, exc.reason, exc.detail, payload)
                outcome = "dead_letter"
            except PermanentError as exc:
                dead_letter(route.queue, route.actor, type(exc).__name__, str(exc), payload)
                outcome = "dead_letter"
            except Exception:
                MESSAGES.labels(route.queue, route.actor, "retry").inc()
                raise
            MESSAGES.labels(route.queue, route.actor, outcome).inc()
            crash_point(resources().settings, "after_commit_before_ack")

        consume.__name__ = consume.__qualname__ = route.actor
        consume.__doc__ = handle.__doc__
        return dramatiq.actor(actor_name=route.actor, queue_name=route.queue)(consume)

    return decorate


def send(actor: dramatiq.Actor[Any, Any], message: Message) -> None:
    """Publish a follow-up message with its stable message ID."""
    from issuance.shared.wire.codec import message_id_for

    built = actor.message_with_options(args=(message.to_payload(),))
    actor.broker.enqueue(built.copy(message_id=message_id_for(message)))
