"""Dramatiq's RabbitMQ broker, with the project's queue type and broker list.

Dramatiq 2.2 has no queue-type option: it declares every queue classic.
This subclass declares the work queues, their ``.DQ`` delay queues and
their ``.XQ`` dead-letter queues with the codec's arguments
(:func:`issuance.shared.wire.codec.queue_arguments`), so workers, the
publisher and the page declare the same queues, quorum ones on a cluster.
It connects to the nodes of ``ISSUANCE_AMQP_URL`` (:mod:`issuance.shared.wire.amqp`)
in turn: a worker whose node dies reconnects to the next.
"""

from __future__ import annotations

from typing import Any

from dramatiq.brokers.rabbitmq import RabbitmqBroker
from issuance.shared.wire import amqp, codec


class QueueTypeRabbitmqBroker(RabbitmqBroker):
    """A RabbitmqBroker whose queues are of ``queue_type`` ("classic" or
    "quorum") and whose connections go to the first live node of ``urls``."""

    def __init__(self, *, urls: str, queue_type: str, **options: Any) -> None:
        # Validate before connecting anything: a typo must not declare queues.
        codec.queue_arguments("probe", queue_type)
        super().__init__(**options)
        self.queue_type = queue_type
        self.parameters = amqp.connection_parameters(urls)

    def _build_queue_arguments(self, queue_name: str) -> dict[str, Any]:
        # Used by Dramatiq for the queue and its delay queue alike.
        return codec.queue_arguments(queue_name, self.queue_type)

    def _declare_xq_queue(self, queue_name: str) -> Any:
        return self.channel.queue_declare(
            queue=codec.xq_name(queue_name), durable=True, arguments=codec.xq_arguments(self.queue_type)
        )
