"""Issuance on a 3-node RabbitMQ cluster with quorum queues, two nodes killed.

A private cluster (tests/cluster/nodes.py) is started and torn down by the
test; PostgreSQL and Redis are the session's private database and Redis db
on the shared services. The real workers (``dramatiq issuance.workers.actors``
subprocesses) and the real publisher get every node's URL. While claims are
published, the node that leads the claims queue is SIGKILLed and restarted;
then the new leader is. Every claim must end credited or refused (lost 0),
no package or credit may be doubled, and ``issuance verify`` must be clean.

Run it alone with ``pytest -s tests/cluster`` to see the figures.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pika.exceptions
import psycopg
import pytest
from issuance.shared.settings import Settings
from issuance.shared.wire import amqp, codec
from issuance.shared.wire.publisher import RabbitPublisher

from tests.chaos.services import PrivateRabbit
from tests.cluster.nodes import RabbitCluster
from tests.conftest import claim, make_activity
from tests.e2e.conftest import Workers, wait_for

CLAIMS = 6000
BUDGET = 5000  # the last 1,000 claims find the activity sold out
REPEATS = 300  # claims sent twice on purpose, besides the publisher's re-sends
CHUNK = 50
PAUSE = 0.2  # between chunks: publishing lasts long enough for two kills


class PacedPublisher(threading.Thread):
    """The real publisher, sending the claims chunk by chunk; it waits at
    each gate until the test opens it, so every kill falls mid-run."""

    def __init__(self, urls: str, messages: list[Any], gates: dict[int, threading.Event]) -> None:
        super().__init__(name="cluster-publisher", daemon=True)
        self.urls = urls
        self.messages = messages
        self.gates = gates
        self.published = 0
        self.confirmed = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with RabbitPublisher(
                self.urls, queue_type="quorum", connect_attempts=20, confirm_timeout=30
            ) as publisher:
                for start in range(0, len(self.messages), CHUNK):
                    for at, gate in self.gates.items():
                        if start >= at:
                            gate.wait(timeout=240)
                    chunk = self.messages[start : start + CHUNK]
                    self.confirmed += publisher.publish_many(chunk)
                    self.published = start + len(chunk)
                    time.sleep(PAUSE)
        except BaseException as exc:  # reported by the test
            self.error = exc


def queue_depths(urls: str) -> dict[str, int]:
    connection = amqp.connect(urls, socket_timeout=5)
    try:
        channel = connection.channel()
        names = [
            *codec.QUEUES,
            *(codec.dq_name(q) for q in codec.QUEUES),
            *(codec.xq_name(q) for q in codec.QUEUES),
        ]
        return {name: int(channel.queue_declare(name, passive=True).method.message_count) for name in names}
    finally:
        connection.close()


def consumers(urls: str, queue: str) -> int:
    connection = amqp.connect(urls, socket_timeout=5)
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.consumer_count)
    except pika.exceptions.ChannelClosedByBroker:
        return 0  # not declared yet
    finally:
        connection.close()


def decided(settings: Settings) -> dict[str, int]:
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute("SELECT status, count(*) FROM claims GROUP BY status").fetchall()
    return {status: int(n) for status, n in rows}


def kill_and_restart(cluster: RabbitCluster, node: PrivateRabbit, down_seconds: float) -> dict[str, float]:
    started = time.monotonic()
    node.crash()
    time.sleep(down_seconds)
    node.start()
    cluster.wait_running(len(cluster.nodes))
    return {"down_s": round(time.monotonic() - started, 1)}


@pytest.mark.timeout(900)
def test_two_node_kills_lose_nothing_and_double_nothing(
    cluster: RabbitCluster, settings: Settings, service_env: dict[str, str], tmp_path: Path
) -> None:
    began = time.monotonic()
    urls = cluster.urls()
    activity = make_activity(settings, budget=BUDGET, codes=BUDGET)["slug"]
    claims = [claim(activity) for _ in range(CLAIMS)]
    # The first claims are sent again mid-run (same claim IDs): absorbed,
    # never a second package.
    messages = [*claims[: CLAIMS // 2], *claims[:REPEATS], *claims[CLAIMS // 2 :]]

    env = {
        **os.environ,
        **service_env,
        "ISSUANCE_AMQP_URL": urls,
        "ISSUANCE_QUEUE_TYPE": "quorum",
        "ISSUANCE_TEST_LOG": str(tmp_path / "workers.log"),
    }
    env.pop("PYTEST_CURRENT_TEST", None)
    workers = Workers(env, processes=2, threads=4, queues=None)
    try:
        wait_for(
            lambda: workers.proc.poll() is not None or consumers(urls, "claims") >= 2,
            timeout=90,
            what="workers to consume from the cluster",
        )
        assert workers.proc.poll() is None, (tmp_path / "workers.log").read_text()[-3000:]

        gates = {len(messages) // 2: threading.Event()}
        publisher_log = _capture("issuance.shared.wire.publisher")
        publisher = PacedPublisher(urls, messages, gates)
        publisher.start()

        # Kill 1: the claims queue's leader, with about a quarter published.
        wait_for(lambda: publisher.published >= len(messages) // 4 or publisher.error, 120, "a quarter")
        first = cluster.leader("claims")
        kills = [{"node": first.node, "role": "leader of claims", **kill_and_restart(cluster, first, 3.0)}]
        gates[len(messages) // 2].set()

        # Kill 2: the new leader (another node), with about three quarters published.
        wait_for(lambda: publisher.published >= len(messages) * 3 // 4 or publisher.error, 180, "3/4")
        second = cluster.leader("claims")
        if second is first:
            second = next(n for n in cluster.nodes if n is not first)
        kills.append(
            {"node": second.node, "role": "leader of claims", **kill_and_restart(cluster, second, 3.0)}
        )

        publisher.join(timeout=300)
        assert not publisher.is_alive(), "the publisher did not finish"
        assert publisher.error is None, repr(publisher.error)
        wait_for(lambda: sum(decided(settings).values()) >= CLAIMS, 300, "every claim to be decided")
        # Nothing may be left over in the queues (a late re-delivery would show here).
        wait_for(lambda: not any(queue_depths(urls)[q] for q in codec.QUEUES), 120, "the queues to drain")
    finally:
        workers.stop()

    states = decided(settings)
    depths = queue_depths(urls)
    verify = subprocess.run(
        [str(Path(sys.executable).with_name("issuance")), "verify", "--json"],
        env={**env, "ISSUANCE_AMQP_URL": urls},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    report = json.loads(verify.stdout)
    counts = report["counts"]
    figures = {
        "messages": len(messages),
        "confirmed": publisher.confirmed,
        "publisher_reconnects": sum("reconnecting" in line for line in publisher_log),
        "publisher_resends_after_refusal": sum("sending them again" in line for line in publisher_log),
        "consumer_restarts": (tmp_path / "workers.log").read_text().count("Restarting consumer"),
        "kills": kills,
        "claims": CLAIMS,
        "credited": states.get("credited", 0),
        "refused": states.get("refused", 0),
        "lost": CLAIMS - sum(states.values()),
        "doubled": counts["codes_bound"] - counts["credited"] + counts["credits"] - counts["credited"],
        "dead_letters": counts["dead_letters"] + sum(depths[codec.xq_name(q)] for q in codec.QUEUES),
        "verify_clean": report["clean"] and verify.returncode == 0,
        "cluster_start_s": round(cluster.start_seconds, 1),
        "duration_s": round(time.monotonic() - began, 1),
    }
    print("cluster test:", json.dumps(figures))
    assert figures["lost"] == 0, figures
    assert figures["doubled"] == 0, figures
    assert figures["confirmed"] == len(messages), figures
    assert (figures["credited"], figures["refused"]) == (BUDGET, CLAIMS - BUDGET), figures
    assert report["refused_by_reason"] == {"sold_out": CLAIMS - BUDGET}, report
    assert figures["dead_letters"] == 0, figures
    assert figures["verify_clean"], verify.stdout + verify.stderr
    assert {k["node"] for k in kills} == {first.node, second.node} and first is not second
    # The kills were felt: workers on the dead nodes moved to live ones.
    assert figures["consumer_restarts"] > 0, figures


def _capture(name: str) -> list[str]:
    """The messages logged by ``name`` from now on."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger(name)
    logger.addHandler(Keep(logging.WARNING))
    return lines
