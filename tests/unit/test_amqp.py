"""Broker URL lists: one parser for every client (issuance.shared.wire.amqp)."""

from __future__ import annotations

import pika
import pytest
from issuance.shared.settings import settings_from
from issuance.shared.wire import amqp, codec
from issuance.shared.wire.publisher import RabbitPublisher

CLUSTER = (
    "amqp://worker:pw-a@rabbit-a:5672/issuance;"
    "amqp://worker:pw%3Bb@rabbit-b:5673/%2F;"
    " amqps://other:pw-c@rabbit-c:5671/sale%2F2026?heartbeat=15 ;"
)


def test_pika_alone_misreads_a_list_which_is_why_the_helper_exists() -> None:
    assert pika.URLParameters("amqp://a:5672/v;amqp://b:5672/v").virtual_host != "v"


def test_each_url_keeps_its_host_port_vhost_and_credentials() -> None:
    a, b, c = amqp.connection_parameters(CLUSTER)
    assert (a.host, a.port, a.virtual_host) == ("rabbit-a", 5672, "issuance")
    assert (a.credentials.username, a.credentials.password) == ("worker", "pw-a")
    assert (b.host, b.port, b.virtual_host) == ("rabbit-b", 5673, "/")
    # A percent-encoded ";" inside a password does not split the list.
    assert (b.credentials.username, b.credentials.password) == ("worker", "pw;b")
    assert (c.host, c.port, c.virtual_host) == ("rabbit-c", 5671, "sale/2026")
    assert (c.credentials.username, c.heartbeat) == ("other", 15)
    assert c.ssl_options is not None and a.ssl_options is None


def test_one_url_is_a_list_of_one() -> None:
    (only,) = amqp.connection_parameters("amqp://guest:guest@127.0.0.1:5672/%2F")
    assert (only.host, only.port, only.virtual_host) == ("127.0.0.1", 5672, "/")


def test_start_rotates_the_list_so_the_next_node_is_tried_first() -> None:
    hosts = [p.host for p in amqp.connection_parameters(CLUSTER, start=1)]
    assert hosts == ["rabbit-b", "rabbit-c", "rabbit-a"]
    assert [p.host for p in amqp.connection_parameters(CLUSTER, start=5)] == hosts[1:] + hosts[:1]


def test_overrides_apply_to_every_node() -> None:
    params = amqp.connection_parameters(CLUSTER, heartbeat=30, socket_timeout=5, blocked_connection_timeout=7)
    assert {(p.heartbeat, p.socket_timeout, p.blocked_connection_timeout) for p in params} == {(30, 5, 7)}


@pytest.mark.parametrize("value", ["", " ; ", "rabbit-a:5672", "http://rabbit-a/", "amqp:///vhost"])
def test_unusable_values_are_refused(value: str) -> None:
    with pytest.raises(amqp.BrokerUrlError):
        amqp.broker_urls(value)


def test_errors_and_logs_never_show_a_password() -> None:
    with pytest.raises(amqp.BrokerUrlError) as caught:
        amqp.broker_urls("amqp://worker:pw-a@rabbit-a/v;http://worker:secret@rabbit-b/")
    assert "secret" not in str(caught.value)
    assert amqp.redacted("amqp://worker:secret@rabbit-a/v") == "amqp://worker:***@rabbit-a/v"


def test_the_publisher_refuses_a_malformed_list_at_once() -> None:
    with pytest.raises(amqp.BrokerUrlError):
        RabbitPublisher("amqp://rabbit-a/v;rabbit-b")


def test_the_worker_broker_connects_to_every_node_of_the_setting() -> None:
    from issuance.workers.quorum import QueueTypeRabbitmqBroker

    broker = QueueTypeRabbitmqBroker(urls=CLUSTER, queue_type="quorum")
    assert [p.host for p in broker.parameters] == ["rabbit-a", "rabbit-b", "rabbit-c"]
    assert [p.virtual_host for p in broker.parameters] == ["issuance", "/", "sale/2026"]


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_the_worker_broker_declares_what_the_codec_says(queue_type: str) -> None:
    from issuance.workers.quorum import QueueTypeRabbitmqBroker

    broker = QueueTypeRabbitmqBroker(urls="amqp://127.0.0.1:1/%2F", queue_type=queue_type)
    for queue in codec.QUEUES:
        assert broker._build_queue_arguments(queue) == codec.queue_arguments(queue, queue_type)


def test_quorum_queues_dead_letter_at_least_once_with_a_delivery_limit() -> None:
    arguments = codec.queue_arguments("claims", "quorum")
    assert arguments["x-queue-type"] == "quorum"
    assert arguments["x-dead-letter-routing-key"] == "claims.XQ"
    # RabbitMQ accepts at-least-once dead-lettering only with reject-publish.
    assert arguments["x-dead-letter-strategy"] == "at-least-once"
    assert arguments["x-overflow"] == "reject-publish"
    assert arguments["x-delivery-limit"] == codec.DELIVERY_LIMIT
    assert codec.xq_arguments("quorum")["x-queue-type"] == "quorum"
    assert "x-queue-type" not in codec.queue_arguments("claims") | codec.xq_arguments()


def test_queue_type_setting_is_checked() -> None:
    assert settings_from({}).queue_type == "classic"
    assert settings_from({"ISSUANCE_QUEUE_TYPE": "quorum"}).queue_type == "quorum"
    with pytest.raises(ValueError, match="QUEUE_TYPE"):
        settings_from({"ISSUANCE_QUEUE_TYPE": "stream"})
    with pytest.raises(ValueError):
        codec.queue_arguments("claims", "stream")


def test_the_publisher_tries_the_node_after_the_one_it_lost_first() -> None:
    from types import SimpleNamespace

    publisher = RabbitPublisher(CLUSTER)
    params = amqp.connection_parameters(CLUSTER, start=publisher._node)
    reached_c = SimpleNamespace(_impl=SimpleNamespace(params=params[2]))
    publisher._node = publisher._index_of(reached_c, params)
    assert publisher._node == 2
    publisher._drop()  # node c was lost
    assert amqp.connection_parameters(CLUSTER, start=publisher._node)[0].host == "rabbit-a"
    publisher._drop()
    assert publisher._node == 1
