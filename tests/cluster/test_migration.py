"""The migration from classic to quorum queues, step by step as documented
(deploy/compose/README.md, "Migrating a classic deployment to quorum
queues"), on the private cluster.

The old deployment uses classic queues in vhost ``issuance-classic``: a backlog of
claims waits there, two retries wait in ``claims.DQ`` for their delay, and
one message that ran out of retries sits in ``claims.XQ``; one more retry
arises when the backlog is gone. Then:

1. a new vhost ``issuance-quorum`` is created;
2. workers with ``ISSUANCE_QUEUE_TYPE=quorum`` start on it (every node's URL);
3. the producers (the real publisher) switch to it and keep sending;
4. the old workers drain the old vhost; its dead letters are drained into
   the store and replayed there (their originals are parked in that vhost);
5. ``rabbitmqctl -q -p issuance-classic list_queues name type messages`` until
   every queue but the ``claims.accepted`` stream (the acceptance ledger,
   which keeps what it was given) shows 0 (messages a worker holds, like a
   retry waiting for its delay, count);
6. the old workers stop and the old vhost is deleted.

Every claim, old or new, must be credited exactly once and ``issuance
verify`` must be clean.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pika
import psycopg
import pytest
from issuance.shared.settings import Settings
from issuance.shared.wire import amqp, codec
from issuance.shared.wire.messages import ClaimRequested
from issuance.shared.wire.publisher import RabbitPublisher

from tests.cluster.nodes import RabbitCluster
from tests.conftest import claim, make_activity
from tests.e2e.conftest import Workers, wait_for

# Not "issuance": the definitions test loads the compose vhost of that name
# into the same package-scoped cluster.
OLD, NEW = "issuance-classic", "issuance-quorum"
BACKLOG = 1500  # waiting in the old vhost when the migration starts
AFTER_SWITCH = 1500  # published to the new vhost while the old one drains
RETRY_DELAY_MS = 8000  # the retries' remaining delay in the old claims.DQ
LATE_RETRY_DELAY_MS = 15000  # a retry that arises when the backlog is gone


def vhost_urls(cluster: RabbitCluster, vhost: str) -> str:
    return ";".join(node.url().replace("/%2F", f"/{vhost}") for node in cluster.nodes)


def add_vhost(cluster: RabbitCluster, vhost: str) -> None:
    first = cluster.nodes[0]
    first.ctl("add_vhost", vhost)
    first.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")


def old_vhost_messages(cluster: RabbitCluster) -> dict[str, int]:
    """Step 5's check, as documented: messages (ready and unacknowledged) per
    queue, but for the acceptance ledger's stream, which keeps what it was
    given (every claim in it also went to ``claims``)."""
    out = cluster.nodes[0].ctl("-q", "-p", OLD, "list_queues", "name", "type", "messages").stdout
    rows = (line.split("\t") for line in out.splitlines() if line.count("\t") == 2)
    return {name: int(count) for name, kind, count in rows if name != "name" and kind != "stream"}


def issuance(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(Path(sys.executable).with_name("issuance")), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def park_in_old_vhost(
    urls: str, retries: list[ClaimRequested], dead: ClaimRequested | None, delay_ms: int
) -> None:
    """What an old deployment under way holds besides its backlog: retries
    waiting in ``claims.DQ`` (as Dramatiq puts them there: queue name and
    ``eta``) and a message that ran out of retries in ``claims.XQ``."""
    connection = amqp.connect(urls)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.queue_declare(
            codec.dq_name("claims"), durable=True, arguments=codec.queue_arguments("claims")
        )
        properties = pika.BasicProperties(delivery_mode=2, content_type=codec.CONTENT_TYPE)
        eta = int(time.time() * 1000) + delay_ms
        for message in retries:
            body = codec.envelope(message) | {"queue_name": codec.dq_name("claims")}
            body["options"] = {**body["options"], "eta": eta, "retries": 1}
            channel.basic_publish("", codec.dq_name("claims"), codec.dumps(body), properties, mandatory=True)
        if dead is None:
            return
        body = codec.envelope(dead)
        body["options"] = {**body["options"], "retries": 20, "traceback": "OperationalError: database down"}
        channel.basic_publish("", codec.xq_name("claims"), codec.dumps(body), properties, mandatory=True)
    finally:
        connection.close()


def credits_per_claim(settings: Settings) -> dict[str, int]:
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(
            """SELECT c.claim_id::text, count(w.entry_id) FROM claims c
                 LEFT JOIN wallet_ledger w USING (claim_id)
                WHERE c.status = 'credited' GROUP BY c.claim_id"""
        ).fetchall()
    return {claim_id: int(n) for claim_id, n in rows}


def consumers(urls: str, queue: str) -> int:
    connection = amqp.connect(urls, socket_timeout=5)
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.consumer_count)
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        connection.close()


@pytest.mark.timeout(600)
def test_classic_to_quorum_through_a_new_vhost_credits_every_claim_once(
    cluster: RabbitCluster, settings: Settings, service_env: dict[str, str], tmp_path: Path
) -> None:
    total = BACKLOG + AFTER_SWITCH + 4  # with the retries, the dead letter and the late retry
    activity = make_activity(settings, budget=total, codes=total)["slug"]
    # Distinct members: each claim is one member's first.
    phones = (f"+86139{n:08d}" for n in range(secrets.randbelow(9 * 10**6) * 10, 10**8))
    backlog = [claim(activity, next(phones)) for _ in range(BACKLOG)]
    retries = [claim(activity, next(phones)) for _ in range(2)]
    dead = claim(activity, next(phones))
    late = claim(activity, next(phones))
    later = [claim(activity, next(phones)) for _ in range(AFTER_SWITCH)]
    base = {**os.environ, **service_env, "ISSUANCE_TEST_LOG": str(tmp_path / "workers.log")}
    base.pop("PYTEST_CURRENT_TEST", None)

    # The old deployment: classic queues in vhost OLD, a backlog waiting.
    add_vhost(cluster, OLD)
    old_urls = vhost_urls(cluster, OLD)
    old_env = {**base, "ISSUANCE_AMQP_URL": old_urls, "ISSUANCE_QUEUE_TYPE": "classic"}
    with RabbitPublisher(old_urls, queue_type="classic") as publisher:
        assert publisher.publish_many(backlog) == BACKLOG
    park_in_old_vhost(old_urls, retries, dead, RETRY_DELAY_MS)
    old_workers = Workers(old_env, processes=1, threads=4, queues=None)

    try:
        # 1. The new vhost.
        add_vhost(cluster, NEW)
        new_urls = vhost_urls(cluster, NEW)
        new_env = {**base, "ISSUANCE_AMQP_URL": new_urls, "ISSUANCE_QUEUE_TYPE": "quorum"}
        # 2. Quorum workers on it; they declare the quorum queues and wait.
        new_workers = Workers(new_env, processes=1, threads=4, queues=None)
        try:
            wait_for(lambda: consumers(new_urls, "claims") >= 1, 90, "the quorum workers")
            # 3. The producers switch: from now on nothing new reaches the old vhost.
            switched: dict[str, Any] = {}

            def produce() -> None:
                with RabbitPublisher(new_urls, queue_type="quorum") as publisher:
                    switched["confirmed"] = sum(
                        publisher.publish_many(later[i : i + 100]) for i in range(0, AFTER_SWITCH, 100)
                    )

            producer = threading.Thread(target=produce)
            producer.start()
            # 4. The old workers drain the old vhost; its dead letters go
            # into the store and back to its workers.
            drained = issuance(old_env, "dead-letters", "drain").stdout
            assert "moved 1 " in drained, drained
            issuance(old_env, "dead-letters", "replay", "--queue", "claims")
            # The last claim of the backlog fails once: its retry waits in
            # claims.DQ, held by an old worker, when the work queue is empty.
            wait_for(lambda: old_vhost_messages(cluster).get("claims") == 0, 240, "the old backlog")
            park_in_old_vhost(old_urls, [late], None, LATE_RETRY_DELAY_MS)
            # 5. Drained when every queue of the old vhost but the ledger shows 0 messages.
            checks: list[dict[str, int]] = []

            def old_is_empty() -> bool:
                checks.append(old_vhost_messages(cluster))
                return not any(checks[-1].values())

            wait_for(old_is_empty, 240, "the old vhost to drain")
            producer.join(timeout=120)
            assert switched.get("confirmed") == AFTER_SWITCH, switched
            # What the check waited for: the retry the old workers held
            # (unacknowledged in claims.DQ, nothing left in the work queues)
            # was credited before it passed.
            held = [c for c in checks if c["claims.DQ"] and not any(c[q] for q in codec.QUEUES)]
            assert held, checks
            credited = credits_per_claim(settings)
            missing = [c for c in [*backlog, *retries, dead, late] if str(c.claim_id) not in credited]
            assert not missing, (len(missing), checks[-3:])
            # 6. The old workers stop; the old vhost goes.
            old_workers.stop()
            cluster.nodes[0].ctl("delete_vhost", OLD)
            wait_for(
                lambda: len(credits_per_claim(settings)) == total,
                240,
                "every claim credited",
            )
        finally:
            new_workers.stop()
    finally:
        old_workers.stop()

    credited = credits_per_claim(settings)
    every = [*backlog, *retries, dead, late, *later]
    assert sorted(credited) == sorted(str(c.claim_id) for c in every)
    assert set(credited.values()) == {1}, "a claim credited twice"
    verify = subprocess.run(
        [str(Path(sys.executable).with_name("issuance")), "verify", "--json"],
        env={**base, "ISSUANCE_AMQP_URL": new_urls, "ISSUANCE_QUEUE_TYPE": "quorum"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    report = json.loads(verify.stdout)
    assert report["clean"] and verify.returncode == 0, verify.stdout
    # Nothing waits in the new vhost either, and its queues are quorum ones.
    listing = cluster.nodes[0].ctl("-q", "-p", NEW, "list_queues", "name", "type", "messages").stdout
    rows = [line.split("\t") for line in listing.splitlines() if "\t" in line and not line.startswith("name")]
    assert {row[1] for row in rows if row[0] in codec.QUEUES} == {"quorum"}, listing
    assert all(row[2] == "0" for row in rows if row[0] in codec.QUEUES), listing
    assert "moved 1 " in drained
    print(
        "migration:",
        json.dumps(
            {
                "backlog_old": BACKLOG,
                "retries_old_dq": len(retries) + 1,
                "checks_seeing_a_held_retry": len(held),
                "dead_letters_old_xq": 1,
                "published_new": AFTER_SWITCH,
                "credited_once": len(credited),
                "checks_until_drained": len(checks),
                "first_check": checks[0],
            }
        ),
    )
