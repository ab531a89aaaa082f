"""Acknowledge a delivery only when it is safe to forget it.

Dramatiq acknowledges a delivery once the actor and the
``after_process_message`` hooks have run, even when a hook failed:
``Broker.emit_after`` logs the error and goes on. So when the ``Retries``
middleware cannot publish a message's retry copy to ``<queue>.DQ`` (RabbitMQ
nacks it, a policy refuses it, the publishing connection drops), the original
delivery is acknowledged and the message is gone. Two guards close that:

- :class:`ConfirmedRetries`: a retry whose copy the broker did not confirm
  hands the delivery back to its queue (``basic_nack`` with ``requeue=True``)
  after a short hold. It is neither acknowledged nor dead-lettered: nothing
  is wrong with the message, only with the broker.
- :class:`GuardedRabbitmqBroker`: its consumers settle (ack, nack, hand back)
  a delivery only on the channel it came in on. Dramatiq's consumer thread
  settles through whichever consumer is current; after a reconnect that is a
  new channel, whose delivery tags start again at 1, so an ack meant for the
  old delivery would settle a different message there. The old channel is
  closed by then and RabbitMQ has already put its deliveries back, so the
  right thing is to do nothing.
"""

from __future__ import annotations

import itertools
import logging
import time
from functools import partial
from typing import Any

import pika
from dramatiq.broker import Broker, Consumer, MessageProxy
from dramatiq.brokers.rabbitmq import RabbitmqBroker, _RabbitmqConsumer
from dramatiq.errors import ConnectionClosed
from dramatiq.middleware import Retries

log = logging.getLogger(__name__)

# Set on a MessageProxy whose retry copy was not confirmed: the consumer hands
# it back to its queue instead of acknowledging it.
HAND_BACK = "issuance_hand_back"
# Set on a MessageProxy by the consumer that received it.
GENERATION = "issuance_consumer_generation"
# How long a worker thread holds a delivery it hands back, so that an outage
# of the database and of the delay queue together is not a hot loop.
MAX_HOLD_MS = 5_000

_generations = itertools.count(1)


def hand_back(message: MessageProxy) -> None:
    """Have the consumer return ``message`` to its queue instead of acking it."""
    setattr(message, HAND_BACK, True)


class ConfirmedRetries(Retries):
    """Dramatiq's ``Retries``, except that a retry copy the broker refuses
    leaves the original delivery in RabbitMQ's hands."""

    def after_process_message(
        self, broker: Broker, message: MessageProxy, *, result: Any = None, exception: Any = None
    ) -> None:
        try:
            super().after_process_message(broker, message, result=result, exception=exception)  # type: ignore[no-untyped-call]
        except Exception as exc:
            if message.failed:
                # Retries exhausted: the nack dead-letters it; only a follow-up failed.
                raise
            # Marked before the hold: whatever interrupts the hold, the mark stands.
            hand_back(message)
            hold_ms = min(self.min_backoff, MAX_HOLD_MS)
            log.error(
                "message %s failed and its retry copy was not confirmed (%s: %s);"
                " handing the delivery back to %s in %d ms",
                message.message_id,
                type(exc).__name__,
                exc,
                message.queue_name,
                hold_ms,
            )
            time.sleep(hold_ms / 1000)


class GuardedConsumer(_RabbitmqConsumer):
    """A RabbitMQ consumer that settles only its own channel's deliveries and
    hands back those marked by :func:`hand_back`."""

    def __init__(self, broker: RabbitmqBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)  # type: ignore[no-untyped-call]
        self.generation = next(_generations)

    def __next__(self) -> MessageProxy | None:
        message: MessageProxy | None = super().__next__()  # type: ignore[no-untyped-call]
        if message is not None:
            setattr(message, GENERATION, self.generation)
        return message

    def ack(self, message: MessageProxy) -> None:
        if not self._owns(message, "ack"):
            return
        if getattr(message, HAND_BACK, False):
            self._hand_back(message)
            return
        super().ack(message)  # type: ignore[no-untyped-call]

    def nack(self, message: MessageProxy) -> None:
        if self._owns(message, "nack"):
            super().nack(message)  # type: ignore[no-untyped-call]

    def _owns(self, message: MessageProxy, action: str) -> bool:
        if getattr(message, GENERATION, None) == self.generation:
            return True
        log.warning(
            "not settling (%s) message %s: it came in on a channel closed since,"
            " and RabbitMQ delivers it again",
            action,
            message.message_id,
        )
        return False

    def _hand_back(self, message: MessageProxy) -> None:
        """Return the delivery to the head of its queue (Dramatiq's nack
        sends it to the dead-letter queue instead)."""
        tag = message._tag  # the delivery tag, where Dramatiq keeps it
        try:
            self.known_tags.remove(tag)
            self.connection.add_callback_threadsafe(partial(self.channel.basic_nack, tag, requeue=True))
        except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]
        except KeyError:
            log.warning("not handing back message %s: its delivery is not pending here", message.message_id)


class GuardedRabbitmqBroker(RabbitmqBroker):
    """Dramatiq's RabbitMQ broker with :class:`GuardedConsumer` consumers."""

    @property
    def consumer_class(self) -> type[Consumer]:
        return GuardedConsumer
