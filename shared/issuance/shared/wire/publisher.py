"""The publisher library.

    from issuance.shared.wire.publisher import RabbitPublisher
    from issuance.shared.wire.messages import OrderPlaced

    with RabbitPublisher.from_settings(load_settings()) as publisher:
        publisher.publish(OrderPlaced(order_id="SO-1", member_id=7, amount_cents=1999, placed_at=now))
        publisher.publish_many(events)   # confirmed as a batch

Every message is persistent and counts as published only once RabbitMQ has
confirmed it. ``publish_many`` keeps up to ``window`` messages in flight and
collects their confirms together instead of waiting for each in turn. A
dropped connection is re-opened and the unconfirmed messages are sent again:
a message may then arrive twice, which the workers absorb (every message has
a stable ID and an idempotency key). Given the nodes of a cluster
(``amqp://a;amqp://b;amqp://c``, see :mod:`issuance.shared.wire.amqp`), the
publisher reconnects to the node after the one it lost, then the others.

Claims also go into the acceptance ledger (the ``claims.accepted`` stream,
:data:`issuance.shared.wire.codec.LEDGER_QUEUE`) in the same publish: they
are routed through a direct exchange to which the ``claims`` queue and the
stream are both bound, and RabbitMQ confirms a message only once every
queue it was routed to has it. Through the producers' exchange the deploy
definitions bind the stream; publishing to the default exchange, the
publisher declares the exchange, the stream and both bindings itself.
"""

from __future__ import annotations

import abc
import contextlib
import itertools
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, Self

import pika
import pika.exceptions
from issuance.shared.errors import PublishError
from issuance.shared.settings import Settings
from issuance.shared.wire import amqp, codec
from issuance.shared.wire.messages import ClaimRequested, ClaimsRequested, Message
from pika.spec import Basic

log = logging.getLogger(__name__)

CONNECTION_ERRORS = (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError, OSError)
# Publishes are written out (and confirms read in) every this many messages
# rather than after each one.
FLUSH_EVERY = 200

# (queue, encoded envelope, message ID)
Item = tuple[str, bytes, str]


def _noop() -> None:
    pass


def encode(message: Message) -> Item:
    """A message as it goes on the wire: (queue, body, message ID)."""
    envelope = codec.envelope(message)
    return envelope["queue_name"], codec.dumps(envelope), envelope["message_id"]


class Publisher(abc.ABC):
    """Publishes messages so that they are safely in the broker on return."""

    def publish(self, message: Message) -> None:
        self.publish_many((message,))

    @abc.abstractmethod
    def publish_many(self, messages: Iterable[Message]) -> int:
        """Publish all of ``messages``; return how many were confirmed.
        Raises PublishError if any could not be confirmed."""

    def publish_encoded(self, items: Iterable[Item]) -> int:
        """Publish envelopes as they are, (queue, body, message ID) each:
        what the sweeper re-drives from the ledger, byte for byte."""
        raise NotImplementedError(f"{type(self).__name__} does not publish encoded envelopes")

    def publish_claims(self, claims: Sequence[ClaimRequested], *, batch: int = 200) -> int:
        """Publish claims packed ``batch`` to a message (claims-requested): the
        workers decide each batch in one transaction. Each claim keeps its own
        claim ID, so packing changes nothing about idempotency."""
        packed = [
            ClaimsRequested(batch_id=uuid.uuid4(), claims=tuple(claims[i : i + batch]))
            for i in range(0, len(claims), batch)
        ]
        self.publish_many(packed)
        return len(claims)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the connection."""

    def keepalive(self) -> None:  # noqa: B027 - optional hook
        """Serve heartbeats while idle; long-lived publishers call it now and then."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class RabbitPublisher(Publisher):
    """Publishes to RabbitMQ with pika, persistent messages and publisher confirms."""

    def __init__(
        self,
        url: str,
        *,
        window: int = 5000,
        confirm_timeout: float = 30.0,
        connect_attempts: int = 5,
        declare: bool = True,
        exchange: str = "",
        queue_type: str = "classic",
        ledger: bool = True,
    ) -> None:
        """``url``: one broker URL or several separated by ``;`` (a cluster);
        ``queue_type``: how the queues are declared (``declare``); ``ledger``
        false, on the default exchange: claims go straight to their queue,
        not into the acceptance ledger (the sweeper's re-drive of a claim
        the ledger already holds; it declares no exchange either)."""
        self.url = url
        # Parse now: a malformed list fails at start-up, not on first publish.
        self._nodes = len(amqp.broker_urls(url))
        # The node tried first on the next connect: after a failure, the next one.
        self._node = 0
        self.queue_type = queue_type
        self.window = window
        self.confirm_timeout = confirm_timeout
        self.connect_attempts = connect_attempts
        # Through a producers' exchange the queues are provisioned by the
        # deploy definitions: the producer user may not declare (configure).
        self.declare = declare and not exchange
        self.exchange = exchange
        # Where claims go when publishing to the default exchange: through
        # the ledger's exchange, declared at connect.
        self._claims_exchange = codec.LEDGER_EXCHANGE if self.declare and ledger else ""
        self._connection: pika.BlockingConnection | None = None
        self._channel: Any = None
        self._next_tag = 1
        # Unconfirmed delivery tags, in publishing order.
        self._pending: OrderedDict[int, None] = OrderedDict()
        self._routes: dict[int, str] = {}
        self._failed: set[int] = set()
        self._select_ok = False

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> RabbitPublisher:
        options.setdefault("exchange", settings.producer_exchange)
        options.setdefault("queue_type", settings.queue_type)
        return cls(settings.amqp_url, **options)

    # -- connection ---------------------------------------------------------

    def _connect(self) -> None:
        last: Exception | None = None
        for attempt in range(self.connect_attempts):
            # Every node, beginning with the one after the node that failed.
            params = amqp.connection_parameters(
                self.url, start=self._node, heartbeat=30, blocked_connection_timeout=self.confirm_timeout
            )
            try:
                self._connection = pika.BlockingConnection(params)
                self._node = self._index_of(self._connection, params)
                break
            except CONNECTION_ERRORS as exc:
                last = exc
                time.sleep(min(0.2 * 2**attempt, 3.0))
        else:
            raise PublishError(f"cannot connect to RabbitMQ: {last}") from last
        channel = self._connection.channel()
        if self.declare:
            for queue in codec.QUEUES:
                channel.queue_declare(
                    queue, durable=True, arguments=codec.queue_arguments(queue, self.queue_type)
                )
                channel.queue_declare(
                    codec.xq_name(queue), durable=True, arguments=codec.xq_arguments(self.queue_type)
                )
        if self._claims_exchange:
            declare_ledger(channel)
        # Confirms are collected asynchronously (the blocking channel's own
        # confirm mode waits for each publish in turn).
        self._select_ok = False
        channel._impl.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_select_ok)
        channel._impl.add_on_return_callback(self._on_return)
        self._channel = channel
        # A new channel numbers its deliveries from 1 again.
        self._next_tag = 1
        self._pending.clear()
        self._wait(lambda: self._select_ok, "confirm.select-ok")

    def _index_of(self, connection: pika.BlockingConnection, params: list[pika.URLParameters]) -> int:
        """The position in the URL list of the node ``connection`` reached."""
        reached = connection._impl.params
        for offset, candidate in enumerate(params):
            if (candidate.host, candidate.port) == (reached.host, reached.port):
                return (self._node + offset) % self._nodes
        return self._node

    def _on_select_ok(self, _frame: Any) -> None:
        self._select_ok = True
        self._wake()

    def _wake(self) -> None:
        """End the current ``process_data_events`` call now. The confirm
        callbacks run on the low-level channel, which the blocking
        connection's loop does not watch: without this wake-up every wait
        lasted its whole time slice (50 ms a batch, 20 confirms/s one by one)."""
        if self._connection is not None:
            self._connection.add_callback_threadsafe(_noop)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        if method.multiple:
            # Everything still unconfirmed up to the tag: the oldest entries.
            tags = []
            while self._pending and next(iter(self._pending)) <= method.delivery_tag:
                tags.append(self._pending.popitem(last=False)[0])
        else:
            self._pending.pop(method.delivery_tag, None)
            tags = [method.delivery_tag]
        if isinstance(method, Basic.Nack):
            self._failed.update(tags)
        if not self._pending:
            self._wake()

    def _on_return(self, _channel: Any, _method: Any, properties: Any, _body: bytes) -> None:
        # Unroutable (its queue is gone): the ack that follows must not count.
        for tag, mid in self._routes.items():
            if mid == properties.message_id:
                self._failed.add(tag)

    def _wait(self, done: Any, what: str) -> None:
        assert self._connection is not None
        deadline = time.monotonic() + self.confirm_timeout
        while not done():
            if time.monotonic() > deadline:
                raise PublishError(f"timed out waiting for {what}")
            self._connection.process_data_events(time_limit=0.05)

    # -- publishing ---------------------------------------------------------

    def publish_many(self, messages: Iterable[Message]) -> int:
        return self.publish_encoded(map(encode, messages))

    def publish_encoded(self, items: Iterable[Item]) -> int:
        todo = iter(items)
        confirmed = 0
        # Each batch is the next message and up to window - 1 more, encoded
        # as they are sent: the broker takes the first ones meanwhile.
        for first in todo:
            confirmed += self._publish_batch(
                itertools.chain((first,), itertools.islice(todo, self.window - 1))
            )
        return confirmed

    def _publish_batch(self, batch: Iterable[Item]) -> int:
        """Publish ``batch`` (read once, by the first attempt) until every
        message is confirmed; return how many there were."""
        todo = iter(batch)
        failed: list[Item] = []
        size: int | None = None
        for attempt in range(self.connect_attempts):
            sent: dict[int, Item] = {}
            try:
                failed = self._try_batch(todo, sent)
            except CONNECTION_ERRORS as exc:
                log.warning("publish interrupted (%s); reconnecting, attempt %d", exc, attempt + 1)
                self._drop()
                # All of this attempt again: what went out and what had not yet.
                failed = [*sent.values(), *todo]
                size = len(failed) if size is None else size
                todo = iter(failed)
                continue
            size = len(sent) if size is None else size
            if not failed:
                return size
            # Refused (a quorum queue electing a new leader after its node
            # died nacks publishes for a few seconds): wait, then send again.
            log.warning("%d of %d messages were refused; sending them again", len(failed), size)
            time.sleep(min(0.2 * 2**attempt, 3.0))
            todo = iter(failed)
        raise PublishError(f"{len(failed)} of {size} messages were not confirmed")

    def _try_batch(self, batch: Iterator[Item], sent: dict[int, Item]) -> list[Item]:
        """Publish, noting each message in ``sent`` under its delivery tag as it
        goes out; wait for every confirm and return what must be sent again."""
        if self._connection is None or self._connection.is_closed:
            self._connect()
        assert self._connection is not None
        self._failed.clear()
        self._routes.clear()
        # The low-level channel's publish only buffers the frames: the
        # blocking one would write them and poll the socket for every message.
        publish = self._channel._impl.basic_publish
        claims_exchange = self.exchange or self._claims_exchange
        for item in batch:
            queue, body, message_id = item
            tag = self._next_tag
            self._next_tag += 1
            sent[tag] = item
            self._pending[tag] = None
            self._routes[tag] = message_id
            publish(
                exchange=claims_exchange if queue == codec.LEDGER_ROUTE else self.exchange,
                routing_key=queue,
                body=body,
                properties=pika.BasicProperties(
                    delivery_mode=2, content_type=codec.CONTENT_TYPE, message_id=message_id
                ),
                mandatory=True,
            )
            if len(sent) % FLUSH_EVERY == 0:
                self._connection.process_data_events(time_limit=0)
        self._wait(lambda: not self._pending, "publisher confirms")
        return [sent[tag] for tag in sorted(self._failed)]

    def _drop(self) -> None:
        """Forget a broken connection; the next connect starts at the next node."""
        self._pending.clear()
        self._node = (self._node + 1) % self._nodes
        if self._connection is not None:
            with contextlib.suppress(Exception):  # the connection is already broken
                self._connection.close()
        self._connection = None
        time.sleep(0.2)

    def keepalive(self) -> None:
        """A blocking connection answers heartbeats only while it is called:
        an idle publisher calls this so RabbitMQ does not drop it."""
        if self._connection is None or not self._connection.is_open:
            return
        try:
            self._connection.process_data_events(time_limit=0)
        except CONNECTION_ERRORS as exc:
            log.warning("idle publisher connection lost (%s); reconnecting on the next publish", exc)
            self._drop()

    def close(self) -> None:
        if self._connection is not None and self._connection.is_open:
            self._connection.close()
        self._connection = None


def declare_ledger(channel: Any) -> None:
    """The ledger stream and the exchange through which claims reach it and
    their queue (both bound with the routing key ``claims``)."""
    channel.exchange_declare(codec.LEDGER_EXCHANGE, exchange_type="direct", durable=True)
    channel.queue_declare(codec.LEDGER_QUEUE, durable=True, arguments=codec.ledger_arguments())
    for queue in (codec.LEDGER_ROUTE, codec.LEDGER_QUEUE):
        channel.queue_bind(queue, codec.LEDGER_EXCHANGE, routing_key=codec.LEDGER_ROUTE)


class BrokerPublisher(Publisher):
    """Publishes through a Dramatiq broker object: the in-process stub of the
    embedded demo, or any broker a test hands in."""

    def __init__(self, broker: Any) -> None:
        self.broker = broker

    def publish_many(self, messages: Iterable[Message]) -> int:
        from dramatiq import Message as DramatiqMessage

        count = 0
        for message in messages:
            envelope = codec.envelope(message)
            self.broker.enqueue(DramatiqMessage(**envelope))
            count += 1
        return count

    def publish_encoded(self, items: Iterable[Item]) -> int:
        from dramatiq import Message as DramatiqMessage

        count = 0
        for _queue, body, _message_id in items:
            self.broker.enqueue(DramatiqMessage(**codec.OrjsonEncoder().decode(body)))
            count += 1
        return count
