"""The guarded RabbitMQ consumer on the real broker: a delivery is settled
only on the channel it came in on, and one handed back returns to its queue."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import dramatiq
import pytest
from dramatiq.broker import MessageProxy
from issuance.workers.delivery import GuardedRabbitmqBroker, hand_back


@pytest.fixture
def broker(settings) -> Iterator[GuardedRabbitmqBroker]:
    b = GuardedRabbitmqBroker(url=settings.amqp_url, confirm_delivery=True, middleware=[])
    yield b
    b.close()


def _queue_with(broker: GuardedRabbitmqBroker, count: int) -> str:
    queue = f"delivery-{secrets.token_hex(4)}"
    broker.declare_queue(queue, ensure=True)
    for n in range(count):
        broker.enqueue(dramatiq.Message(queue_name=queue, actor_name="a", args=(n,), kwargs={}, options={}))
    return queue


def _next(consumer) -> MessageProxy:
    for _ in range(20):
        message = next(consumer)
        if message is not None:
            return message
    raise AssertionError("no delivery")


def _ready(broker: GuardedRabbitmqBroker, queue: str, expected: int) -> int:
    deadline = time.monotonic() + 10
    while (ready := broker.get_queue_message_counts(queue)[0]) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return ready


def test_an_ack_meant_for_a_closed_channel_settles_nothing_on_the_new_one(broker):
    queue = _queue_with(broker, 2)
    first = broker.consume(queue, prefetch=1, timeout=500)
    old = _next(first)
    first.connection.close()  # the consuming connection drops; RabbitMQ puts `old` back
    second = broker.consume(queue, prefetch=1, timeout=500)
    current = _next(second)
    assert current._tag == old._tag, "delivery tags start again on the new channel"
    # Dramatiq's consumer thread settles through whichever consumer is current.
    second.ack(old)
    second.close()
    assert _ready(broker, queue, 2) == 2, "the ack of the old delivery settled a different message"


def test_a_delivery_handed_back_returns_to_its_queue_not_to_the_dead_letters(broker):
    queue = _queue_with(broker, 1)
    consumer = broker.consume(queue, prefetch=1, timeout=500)
    message = _next(consumer)
    hand_back(message)
    consumer.ack(message)
    again = _next(consumer)
    assert again.message_id == message.message_id and again.redelivered
    consumer.ack(again)
    consumer.close()
    assert broker.get_queue_message_counts(queue) == (0, 0, 0), "acked once, nothing dead-lettered"
