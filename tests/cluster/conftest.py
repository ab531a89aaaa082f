"""One private 3-node RabbitMQ cluster for the cluster tests (tests/cluster/nodes.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.nodes import RabbitCluster


@pytest.fixture(scope="package")
def cluster() -> Iterator[RabbitCluster]:
    nodes = RabbitCluster()
    yield nodes
    nodes.close()
