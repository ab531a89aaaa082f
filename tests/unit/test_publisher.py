"""The publisher's confirm bookkeeping, fed RabbitMQ's ack and nack frames
by hand."""

from __future__ import annotations

from types import SimpleNamespace

from issuance.shared.wire.publisher import RabbitPublisher
from pika.spec import Basic


def publisher_with_pending(*tags: int) -> RabbitPublisher:
    publisher = RabbitPublisher("amqp://guest:guest@127.0.0.1:1/%2F")
    for tag in tags:
        publisher._pending[tag] = None
    return publisher


def confirm(publisher: RabbitPublisher, method: Basic.Ack | Basic.Nack) -> None:
    publisher._on_confirm(SimpleNamespace(method=method))


def test_a_multiple_ack_confirms_every_earlier_tag_and_no_later_one() -> None:
    publisher = publisher_with_pending(*range(1, 11))
    confirm(publisher, Basic.Ack(delivery_tag=4, multiple=True))
    assert list(publisher._pending) == list(range(5, 11))
    confirm(publisher, Basic.Ack(delivery_tag=10, multiple=True))
    assert not publisher._pending
    assert not publisher._failed


def test_single_acks_may_come_out_of_order() -> None:
    publisher = publisher_with_pending(*range(1, 7))
    confirm(publisher, Basic.Ack(delivery_tag=3))
    confirm(publisher, Basic.Ack(delivery_tag=5))
    assert list(publisher._pending) == [1, 2, 4, 6]
    confirm(publisher, Basic.Ack(delivery_tag=4, multiple=True))
    assert list(publisher._pending) == [6]


def test_nacks_mark_exactly_the_unconfirmed_tags_they_cover() -> None:
    publisher = publisher_with_pending(*range(1, 9))
    confirm(publisher, Basic.Ack(delivery_tag=2))
    confirm(publisher, Basic.Nack(delivery_tag=4, multiple=True))
    confirm(publisher, Basic.Nack(delivery_tag=7))
    assert publisher._failed == {1, 3, 4, 7}
    assert list(publisher._pending) == [5, 6, 8]


def test_nothing_to_publish_opens_no_connection() -> None:
    publisher = RabbitPublisher("amqp://guest:guest@127.0.0.1:1/%2F", connect_attempts=1)
    assert publisher.publish_many([]) == 0
    assert publisher._connection is None
