"""The publisher library against the real RabbitMQ: batches larger than the
window, a connection lost mid-batch, nacked and unroutable messages."""

from __future__ import annotations

import uuid
from typing import Any

import pika
import pika.exceptions
import pytest
from issuance.shared.errors import PublishError
from issuance.shared.settings import Settings
from issuance.shared.wire import codec
from issuance.shared.wire.messages import ClaimRequested, utcnow
from issuance.shared.wire.publisher import FLUSH_EVERY, RabbitPublisher

from tests.conftest import take_all
from tests.integration.web_pipeline import purge


def claims(count: int) -> list[ClaimRequested]:
    now = utcnow()
    return [
        ClaimRequested(claim_id=uuid.uuid4(), activity="spring", phone="+8613800138000", requested_at=now)
        for _ in range(count)
    ]


def drain(settings: Settings, queue: str) -> list[Any]:
    """The properties of every message in ``queue``, taken off it in order."""
    return [properties for properties, _ in take_all(settings, queue)]


def test_batches_larger_than_the_window_arrive_persistent_and_in_order(settings: Settings) -> None:
    purge(settings)
    sent = claims(1000)
    with RabbitPublisher.from_settings(settings, window=300) as publisher:
        assert publisher.publish_many(iter(sent)) == 1000
    got = drain(settings, "claims")
    assert [p.message_id for p in got] == [codec.message_id_for(c) for c in sent]
    assert {(p.delivery_mode, p.content_type) for p in got} == {(2, codec.CONTENT_TYPE)}


def test_a_connection_lost_mid_batch_sends_the_whole_batch_again(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    purge(settings)
    sent = claims(3 * FLUSH_EVERY)
    with RabbitPublisher.from_settings(settings, window=1000) as publisher:
        publisher._connect()
        first = publisher._connection
        assert first is not None
        real = first.process_data_events
        calls = []

        def lost_once(time_limit: float | None = None) -> None:
            calls.append(time_limit)
            if len(calls) == 1:
                raise pika.exceptions.StreamLostError("connection reset")
            real(time_limit=time_limit)

        monkeypatch.setattr(first, "process_data_events", lost_once)
        assert publisher.publish_many(sent) == len(sent)
        assert publisher._connection is not first
    ids = [p.message_id for p in drain(settings, "claims")]
    assert set(ids) == {codec.message_id_for(c) for c in sent}
    assert len(sent) <= len(ids) <= len(sent) + FLUSH_EVERY


def test_nacked_messages_are_sent_again_then_reported(settings: Settings) -> None:
    queue = f"pubtest.bounded.{uuid.uuid4().hex[:8]}"
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = connection.channel()
    channel.queue_declare(queue, arguments={"x-max-length": 3, "x-overflow": "reject-publish"})
    try:
        with (
            RabbitPublisher(settings.amqp_url, declare=False, connect_attempts=2) as publisher,
            pytest.raises(PublishError, match="2 of 5 messages were not confirmed"),
        ):
            publisher._publish_batch([(queue, b"{}", f"m{n}") for n in range(5)])
        assert channel.queue_declare(queue, passive=True).method.message_count == 3
    finally:
        channel.queue_delete(queue)
        connection.close()


def test_unroutable_messages_are_reported_and_routed_ones_kept(settings: Settings) -> None:
    purge(settings)
    with (
        RabbitPublisher.from_settings(settings, connect_attempts=2) as publisher,
        pytest.raises(PublishError, match="1 of 2 messages were not confirmed"),
    ):
        publisher._publish_batch([("claims", b"{}", "routed"), ("pubtest.nowhere", b"{}", "lost")])
    assert [p.message_id for p in drain(settings, "claims")] == ["routed"]
