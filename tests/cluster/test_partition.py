"""A worker host cut off the network: its deliveries go to the other host.

Two test hosts (network namespaces, tests/cluster/hosts.py) run the real
workers against the private 3-node cluster, with the project's own user
(RabbitMQ refuses ``guest`` from anywhere but loopback). While claims are
being decided, the first host's link goes down: no RST, no FIN, its
connections simply go silent. RabbitMQ notices the missed heartbeats, puts
the messages that host held unacknowledged back in the queue, and the
second host decides them. PostgreSQL ends the cut host's open transactions
(idle_in_transaction_session_timeout), so their locks do not hold the other
host up. Every claim must end credited or refused, nothing doubled.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from issuance.shared.settings import Settings
from issuance.shared.wire.publisher import RabbitPublisher

from tests.cluster.hosts import NetHost
from tests.cluster.nodes import RabbitCluster
from tests.cluster.test_cluster import consumers, decided
from tests.conftest import claim, make_activity
from tests.e2e.conftest import wait_for

pytestmark = pytest.mark.skipif(
    shutil.which("socat") is None or shutil.which("ip") is None,
    reason="needs socat and iproute2 (apt-get install socat iproute2)",
)
CLAIMS = 4000
BUDGET = 3500
HEARTBEAT_S = 5


@pytest.fixture
def hosts() -> Iterator[list[NetHost]]:
    made: list[NetHost] = []
    try:
        made += [NetHost(1), NetHost(2)]
        yield made
    finally:
        for host in made:
            host.close()


def held_by(cluster: RabbitCluster, address: str) -> int:
    """Messages delivered to ``address``'s channels and not yet acknowledged."""
    out = cluster.nodes[0].ctl("list_channels", "-q", "--no-table-headers", "name", "messages_unacknowledged")
    held = 0
    for line in out.stdout.splitlines():
        name, _, count = line.rpartition("\t")
        if name.startswith(f"{address}:"):
            held += int(count)
    return held


@pytest.mark.timeout(900)
def test_a_cut_off_host_hands_its_deliveries_to_the_other(
    cluster: RabbitCluster,
    hosts: list[NetHost],
    settings: Settings,
    service_env: dict[str, str],
    tmp_path: Path,
) -> None:
    began = time.monotonic()
    vhost, user, password = f"partition-{secrets.token_hex(3)}", "issuance-test", secrets.token_hex(12)
    first = cluster.nodes[0]
    first.ctl("add_vhost", vhost)
    first.ctl("add_user", user, password, check=False)  # the cluster outlives one test
    for who in (user, "guest"):
        first.ctl("set_permissions", "-p", vhost, who, ".*", ".*", ".*")
    local = ";".join(f"amqp://guest:guest@127.0.0.1:{n.port}/{quote(vhost)}" for n in cluster.nodes)

    database = urlsplit(settings.database_url)
    env_of = {}
    for host in hosts:
        pg, cache = host.forward(database.port or 5432), host.forward(6379)
        env_of[host.name] = {
            **os.environ,
            **service_env,
            "ISSUANCE_QUEUE_TYPE": "quorum",
            "ISSUANCE_AMQP_URL": ";".join(
                f"amqp://{user}:{password}@{host.gateway}:{n.port}/{quote(vhost)}?heartbeat={HEARTBEAT_S}"
                for n in cluster.nodes
            ),
            # A transaction left open by a cut-off host ends after 5 s.
            "ISSUANCE_DATABASE_URL": f"postgresql://postgres@{host.gateway}:{pg}{database.path}"
            "?options=-c%20idle_in_transaction_session_timeout%3D5000",
            "ISSUANCE_REDIS_URL": f"redis://{host.gateway}:{cache}/{urlsplit(settings.redis_url).path.strip('/')}",
        }
        host.workers(env_of[host.name], tmp_path / f"{host.name}.log")
    try:
        wait_for(lambda: consumers(local, "claims") >= 2, 120, "both hosts to consume")
    except AssertionError:
        logs = "\n".join(p.read_text()[-2000:] for p in tmp_path.glob("*.log"))
        raise AssertionError(logs) from None

    activity = make_activity(settings, budget=BUDGET, codes=BUDGET)["slug"]
    claims = [claim(activity) for _ in range(CLAIMS)]

    def publish() -> None:
        with RabbitPublisher(local, queue_type="quorum") as publisher:
            for start in range(0, CLAIMS, 100):
                publisher.publish_many(claims[start : start + 100])
                time.sleep(0.05)

    publishing = threading.Thread(target=publish, daemon=True)
    publishing.start()
    wait_for(lambda: sum(decided(settings).values()) >= CLAIMS // 4, 180, "a quarter decided")
    # Cut while the host holds deliveries (with a few claims in flight it nearly always does).
    held = wait_for(lambda: held_by(cluster, hosts[0].address), 60, "the host to hold deliveries")
    cut_at = time.monotonic()
    hosts[0].cut()
    wait_for(lambda: consumers(local, "claims") <= 1, 120, "RabbitMQ to drop the cut host")
    detected_s = time.monotonic() - cut_at
    publishing.join(timeout=300)
    wait_for(lambda: sum(decided(settings).values()) >= CLAIMS, 300, "every claim decided")

    states = decided(settings)
    verify = subprocess.run(
        [str(Path(sys.executable).with_name("issuance")), "verify", "--json"],
        env={**os.environ, **service_env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    report = json.loads(verify.stdout)
    counts = report["counts"]
    figures = {
        "claims": CLAIMS,
        "hosts": len(hosts),
        "held_by_cut_host": held,
        "cut_detected_s": round(detected_s, 1),
        "credited": states.get("credited", 0),
        "refused": states.get("refused", 0),
        "lost": CLAIMS - sum(states.values()),
        "doubled": counts["codes_bound"] - counts["credited"] + counts["credits"] - counts["credited"],
        "verify_clean": report["clean"] and verify.returncode == 0,
        "duration_s": round(time.monotonic() - began, 1),
    }
    print("partition test:", json.dumps(figures))
    assert figures["lost"] == 0 and figures["doubled"] == 0, figures
    assert (figures["credited"], figures["refused"]) == (BUDGET, CLAIMS - BUDGET), figures
    assert figures["verify_clean"], verify.stdout + verify.stderr
    assert detected_s < HEARTBEAT_S * 6, figures
