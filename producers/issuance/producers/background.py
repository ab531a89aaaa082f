"""Publishing from async code: one thread per process owns the publisher.

pika's blocking connection is not thread-safe and blocks while it waits for
confirms, so an event loop must not call it directly. :class:`PublisherThread`
keeps one connection for the whole process; coroutines hand it messages and
await the broker's confirm. Messages that arrive while a batch is in flight
are published together as the next batch, so a burst of concurrent requests
costs one confirm round trip, not one each, and its claims travel packed in
claims-requested messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable

from issuance.shared.errors import PublishError
from issuance.shared.wire.messages import ClaimRequested, Message
from issuance.shared.wire.publisher import Publisher

log = logging.getLogger(__name__)

_STOP = object()
Waiter = tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None


class PublisherThread:
    """An async facade over a blocking :class:`Publisher`."""

    def __init__(
        self,
        factory: Callable[[], Publisher],
        *,
        max_batch: int = 500,
        idle_seconds: float = 5.0,
        on_confirmed: Callable[[list[Message]], None] | None = None,
    ) -> None:
        """``on_confirmed`` runs in the publishing thread after each confirmed
        batch, before the waiting requests are answered."""
        self._factory = factory
        self._on_confirmed = on_confirmed
        self._max_batch = max_batch
        self._idle_seconds = idle_seconds
        self._queue: queue.SimpleQueue[tuple[Message, Waiter] | object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Publish what is queued, then close the connection."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    async def publish(self, message: Message) -> None:
        """Return once RabbitMQ has confirmed ``message``; raise PublishError otherwise."""
        if not self._thread.is_alive():
            raise PublishError("the publisher thread is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._queue.put((message, (loop, future)))
        await future

    def publish_nowait(self, message: Message) -> None:
        """Queue ``message`` without waiting for its confirm (funnel signals:
        a failure is logged, never shown to the member)."""
        if self._thread.is_alive():
            self._queue.put((message, None))

    def _run(self) -> None:
        publisher = self._factory()
        try:
            while True:
                try:
                    first = self._queue.get(timeout=self._idle_seconds)
                except queue.Empty:
                    publisher.keepalive()
                    continue
                if first is _STOP:
                    return
                batch = [first]
                stop = False
                while len(batch) < self._max_batch:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stop = True
                        break
                    batch.append(item)
                self._publish(publisher, batch)
                if stop:
                    return
        finally:
            publisher.close()

    def _publish(self, publisher: Publisher, batch: list[tuple[Message, Waiter] | object]) -> None:
        items = [item for item in batch if isinstance(item, tuple)]
        claims = [message for message, _ in items if isinstance(message, ClaimRequested)]
        others = [message for message, _ in items if not isinstance(message, ClaimRequested)]
        error: Exception | None = None
        try:
            # Claims that arrived together travel packed (claims-requested):
            # the workers decide a pack in one transaction.
            if claims:
                publisher.publish_claims(claims)
            if others:
                publisher.publish_many(others)
        except Exception as exc:  # every failure must reach the waiting requests
            error = exc if isinstance(exc, PublishError) else PublishError(f"publish failed: {exc!r}")
            log.warning("a batch of %d messages was not confirmed: %s", len(items), exc)
        if error is None and self._on_confirmed is not None:
            try:
                self._on_confirmed([message for message, _ in items])
            except Exception as exc:  # a hook must not turn a confirmed batch into a failure
                log.warning("after-confirm hook failed: %s", exc)
        # One wake-up per event loop for the whole batch, not one per request.
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for _, waiter in items:
            if waiter is not None:
                by_loop.setdefault(waiter[0], []).append(waiter[1])
        for loop, futures in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop has closed
                loop.call_soon_threadsafe(_settle, futures, error)


def _settle(futures: list[asyncio.Future[None]], error: Exception | None) -> None:
    for future in futures:
        if future.done():  # the request was cancelled (client went away)
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
