"""The RabbitMQ definitions of deploy/ load into a real cluster, and the
clients then work with them: the queues exist as quorum queues with the
codec's arguments (a client's declaration would otherwise fail), and the
compose file's development user can publish."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import yaml
from issuance.shared.wire import amqp, codec
from issuance.shared.wire.publisher import RabbitPublisher

from tests.cluster.nodes import RabbitCluster
from tests.conftest import claim

DEPLOY = Path(__file__).parents[2] / "deploy"


def test_compose_definitions_load_and_clients_declare_the_same_queues(cluster: RabbitCluster) -> None:
    # Read by rabbitmqctl as the rabbitmq user: not from pytest's private directories.
    shared = Path(tempfile.mkdtemp(prefix="issuance-definitions-"))
    try:
        shared.chmod(0o755)
        definitions = shared / "definitions.json"
        shutil.copy(DEPLOY / "compose" / "definitions.json", definitions)
        definitions.chmod(0o644)
        cluster.nodes[0].ctl("import_definitions", str(definitions))
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())

    def urls_of(service: str) -> str:
        """The service's own AMQP user, on this test's nodes."""
        user = amqp.connection_parameters(compose["services"][service]["environment"]["ISSUANCE_AMQP_URL"])
        credentials = user[0].credentials
        return ";".join(
            f"amqp://{credentials.username}:{credentials.password}@127.0.0.1:{node.port}/issuance"
            for node in cluster.nodes
        )

    urls = urls_of("worker")
    # The workers' side (the sweeper's re-drive): declaring with the codec's
    # arguments succeeds only if they match the loaded queues.
    with RabbitPublisher(urls, queue_type="quorum", ledger=False) as publisher:
        publisher.publish(claim("definitions-check"))
    # The page, through the producers' exchange it may only write to: the
    # claim reaches `claims` and the acceptance ledger in one confirm.
    exchange = compose["services"]["web"]["environment"]["ISSUANCE_PRODUCER_EXCHANGE"]
    with RabbitPublisher(urls_of("web"), queue_type="quorum", exchange=exchange) as publisher:
        publisher.publish(claim("definitions-check-page"))
    connection = amqp.connect(urls)
    try:
        channel = connection.channel()
        for queue in codec.QUEUES:
            channel.queue_declare(queue, durable=True, arguments=codec.queue_arguments(queue, "quorum"))
            channel.queue_declare(
                codec.dq_name(queue), durable=True, arguments=codec.queue_arguments(queue, "quorum")
            )
        assert channel.queue_declare("claims", passive=True).method.message_count == 2
    finally:
        connection.close()
    listed = cluster.nodes[0].ctl("list_queues", "-q", "--no-table-headers", "-p", "issuance", "name", "type")
    types = dict(line.split("\t") for line in listed.stdout.splitlines() if "\t" in line)
    queues = json.loads((DEPLOY / "compose" / "definitions.json").read_text())["queues"]
    assert len(queues) == 3 * len(codec.QUEUES) + 1
    assert {types[queue["name"]] for queue in queues if queue["name"] != codec.LEDGER_QUEUE} == {"quorum"}
    assert types[codec.LEDGER_QUEUE] == "stream", "the acceptance ledger"
