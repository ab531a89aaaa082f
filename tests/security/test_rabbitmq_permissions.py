"""The deploy definitions (deploy/rabbitmq/definitions.json) loaded into a
private RabbitMQ node: producers may only publish through their exchange
into their own queues; workers consume and publish follow-ups."""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pika.exceptions
import pytest
from issuance.shared.errors import PublishError
from issuance.shared.wire import codec
from issuance.shared.wire.messages import CreditRequested
from issuance.shared.wire.publisher import RabbitPublisher

from tests.chaos.services import PrivateRabbit
from tests.conftest import claim

DEFINITIONS = Path(__file__).parents[2] / "deploy" / "rabbitmq" / "definitions.json"
VHOST = "issuance"
PRODUCER_QUEUES = {"orders", "shares", "claims", "members"}


def test_definitions_declare_every_queue_exactly_as_the_codec_and_dramatiq_do():
    d = json.loads(DEFINITIONS.read_text())
    queues = {q["name"]: q["arguments"] for q in d["queues"]}
    for q in codec.QUEUES:
        assert queues[q] == codec.queue_arguments(q)
        assert queues[codec.dq_name(q)] == codec.queue_arguments(q)
        assert queues[codec.xq_name(q)] == codec.xq_arguments()
    producer_routes = {codec.ROUTES[t].queue for t in codec.ROUTES if t != "credit-requested"}
    bound = {b["destination"] for b in d["bindings"] if b["source"] == "issuance.producers"}
    assert bound - {codec.LEDGER_QUEUE} == producer_routes == PRODUCER_QUEUES
    assert queues[codec.LEDGER_QUEUE] == codec.ledger_arguments()
    assert all(not u["password_hash"] for u in d["users"]), "passwords are set at deploy time, never stored"


@pytest.fixture(scope="module")
def node() -> Iterator[tuple[PrivateRabbit, dict[str, str]]]:
    # Not under pytest's private temporary directory: the rabbitmq user must reach it.
    base = Path(tempfile.mkdtemp(prefix="issuance-rabbit-"))
    base.chmod(0o755)
    rabbit = PrivateRabbit(base)
    try:
        loaded = rabbit.dir / "definitions.json"
        shutil.copy(DEFINITIONS, loaded)
        shutil.chown(loaded, "rabbitmq", "rabbitmq")
        rabbit.ctl("import_definitions", str(loaded))
        passwords = {}
        for user in ("issuance-producer", "issuance-worker", "issuance-monitor"):
            passwords[user] = secrets.token_hex(16)  # no leading "-" (an option to rabbitmqctl)
            rabbit.ctl("change_password", user, passwords[user])
        yield rabbit, passwords
    finally:
        rabbit.close()
        shutil.rmtree(base, ignore_errors=True)


def _url(node: tuple[PrivateRabbit, dict[str, str]], user: str) -> str:
    rabbit, passwords = node
    return f"amqp://{user}:{passwords[user]}@127.0.0.1:{rabbit.port}/{VHOST}"


def _channel(node, user: str):
    connection = pika.BlockingConnection(pika.URLParameters(_url(node, user)))
    return connection, connection.channel()


def _refused(action) -> bool:
    try:
        action()
    except pika.exceptions.ChannelClosedByBroker as exc:
        return exc.reply_code == 403
    return False


def _depth(node, queue: str) -> int:
    connection, channel = _channel(node, "issuance-worker")
    try:
        return int(channel.queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


def test_the_producer_publishes_claims_through_its_exchange(node):
    before = _depth(node, "claims")
    with RabbitPublisher(_url(node, "issuance-producer"), exchange="issuance.producers") as publisher:
        assert publisher.publish_many([claim("spring"), claim("spring")]) == 2
    assert _depth(node, "claims") == before + 2


def test_the_producers_claims_reach_the_ledger_which_the_worker_reads_and_cannot_delete(node):
    from issuance.shared.wire.ledger import now_ms, read

    sent = [claim("ledger"), claim("ledger")]
    with RabbitPublisher(_url(node, "issuance-producer"), exchange="issuance.producers") as publisher:
        publisher.publish_many(sent)
    entries = list(read(_url(node, "issuance-worker"), None, until_ms=now_ms() + 60_000, idle=0.5))
    read_ids = {u.claim_id for e in entries for u in e.units}
    assert {c.claim_id for c in sent} <= read_ids
    connection, channel = _channel(node, "issuance-worker")
    try:
        assert _refused(lambda: channel.queue_delete(codec.LEDGER_QUEUE)), (
            "the ledger outlives a worker's mistake"
        )
    finally:
        if connection.is_open:
            connection.close()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker):
        list(read(_url(node, "issuance-producer"), None, until_ms=now_ms(), idle=0.5))


def test_the_producer_cannot_feed_the_internal_credit_queue(node):
    before = _depth(node, "credits")
    with (
        pytest.raises(PublishError),
        RabbitPublisher(
            _url(node, "issuance-producer"),
            exchange="issuance.producers",
            connect_attempts=1,
            confirm_timeout=5,
        ) as publisher,
    ):
        publisher.publish(CreditRequested(claim_ids=(uuid.uuid4(),)))
    _connection, channel = _channel(node, "issuance-producer")
    assert _refused(lambda: channel.basic_publish("", "credits", b"{}") or channel.basic_get("credits"))
    assert _depth(node, "credits") == before


@pytest.mark.parametrize(
    "action",
    [
        lambda ch: ch.basic_get("claims"),
        lambda ch: ch.basic_consume("orders", lambda *a: None),
        lambda ch: ch.queue_delete("claims"),
        lambda ch: ch.queue_purge("claims"),
        lambda ch: ch.queue_declare("mine", durable=True),
        lambda ch: ch.exchange_declare("mine", "fanout"),
        lambda ch: ch.queue_bind("credits", "issuance.producers", "credits"),
    ],
    ids=["get", "consume", "delete", "purge", "declare-queue", "declare-exchange", "bind"],
)
def test_the_producer_can_neither_read_nor_reconfigure(node, action):
    connection, channel = _channel(node, "issuance-producer")
    try:
        assert _refused(lambda: action(channel))
    finally:
        if connection.is_open:
            connection.close()


def test_the_worker_declares_consumes_and_publishes_follow_ups(node):
    connection, channel = _channel(node, "issuance-worker")
    try:
        for q in codec.QUEUES:  # what Dramatiq declares on start
            channel.queue_declare(q, durable=True, arguments=codec.queue_arguments(q))
            channel.queue_declare(codec.dq_name(q), durable=True, arguments=codec.queue_arguments(q))
            channel.queue_declare(codec.xq_name(q), durable=True, arguments=codec.xq_arguments())
        channel.confirm_delivery()
        channel.basic_publish("", "credits", codec.encode(CreditRequested(claim_ids=(uuid.uuid4(),))))
        method, _, body = channel.basic_get("credits", auto_ack=True)
        assert method is not None and b"credit_claim" in body
        # ...but not into queues that are not the pipeline's
        assert _refused(lambda: channel.queue_declare("elsewhere", durable=True))
    finally:
        if connection.is_open:
            connection.close()


def test_the_monitor_reads_queue_depths_and_nothing_else(node):
    connection, channel = _channel(node, "issuance-monitor")
    try:
        for q in codec.QUEUES:  # what the exporter does
            assert channel.queue_declare(q, passive=True).method.message_count >= 0
            channel.queue_declare(codec.xq_name(q), passive=True)
    finally:
        connection.close()
    for action in (
        lambda ch: ch.basic_get("claims"),
        lambda ch: ch.basic_consume("credits", lambda *a: None),
        lambda ch: ch.basic_publish("", "credits", b"{}") or ch.basic_get("credits"),
        lambda ch: ch.basic_publish("issuance.producers", "claims", b"{}") or ch.basic_get("claims"),
        lambda ch: ch.queue_purge("claims"),
        lambda ch: ch.queue_declare("mine", durable=True),
    ):
        connection, channel = _channel(node, "issuance-monitor")
        try:
            assert _refused(lambda: action(channel))  # noqa: B023 - run at once
        finally:
            if connection.is_open:
                connection.close()


def test_the_guest_account_is_not_in_the_definitions():
    users = {u["name"] for u in json.loads(DEFINITIONS.read_text())["users"]}
    assert "guest" not in users
