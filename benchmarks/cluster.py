"""The cost of quorum queues: a single classic node against a 3-node quorum
cluster, measured in the same run.

    .venv/bin/python -m benchmarks.cluster            # the default run (a few minutes)
    .venv/bin/python -m benchmarks.cluster --quick    # smoke run

Every RabbitMQ node is private (tests/chaos/services.py, tests/cluster/nodes.py:
started here, removed at the end; the shared node is not used).
PostgreSQL and Redis are a private database and Redis db on the shared
services. For each target, one claim per message (as the page sends them):

  publish   ``--messages`` claims to each target through a RabbitPublisher
            of its own (persistent, publisher confirms), ``--chunk``
            messages to each target in turn, no worker running;
  drain     the real workers (``dramatiq issuance.workers.actors``, like
            ``issuance worker``) started on that backlog, timed from the
            first claim decided until every claim is credited.

Targets: ``classic, 1 node`` (the reference), ``quorum, 1 node`` (the queue
type alone, another vhost of the same node) and ``quorum, 3 nodes``. All
four nodes run for the whole measurement, and ``--rounds`` alternate the
targets, so a change in the machine's load reaches each alike; the median of
the rounds is reported. Then, on the cluster, ``--kill-messages`` claims are
drained while the claims queue's leader node is SIGKILLed, kept down
``--down-seconds`` and restarted: the drain rate before the kill, while the
node is down (and rejoining), and after. Every rate is also given as a
ratio to the classic single node of the same run, with the machine's load
average. ``issuance verify`` must be clean at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import redis
from issuance.shared.db import database
from issuance.shared.settings import PREFIX, Settings, settings_from
from issuance.shared.wire.messages import ClaimRequested, new_claim_id, utcnow
from issuance.shared.wire.publisher import RabbitPublisher
from rich.console import Console
from rich.table import Table

from benchmarks.harness import ADMIN_DSN, ROOT, WorkerProcesses
from benchmarks.pipeline import decided, make_activity
from tests.chaos.services import PrivateRabbit
from tests.cluster.nodes import RabbitCluster

console = Console(stderr=True)


@contextlib.contextmanager
def private_database() -> Iterator[dict[str, str]]:
    """A fresh database and Redis db on the shared services, dropped after."""
    tag = f"issuance_cb_{secrets.token_hex(4)}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{tag}"')
    env = {
        f"{PREFIX}DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/{tag}",
        f"{PREFIX}REDIS_URL": f"redis://127.0.0.1:6379/{int(tag[-2:], 16) % 15 + 1}",
        f"{PREFIX}PHONE_KEY": f"benchmark-phone-key-{tag}",
    }
    redis.Redis.from_url(env[f"{PREFIX}REDIS_URL"]).flushdb()
    database.upgrade(settings_from({**env, f"{PREFIX}AMQP_URL": "amqp://localhost/"}))
    try:
        yield env
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{tag}" WITH (FORCE)')


def add_vhost(node: PrivateRabbit, vhost: str) -> str:
    """Create ``vhost`` on ``node`` (and so on its cluster) for guest; its URL on ``node``."""
    node.ctl("add_vhost", vhost)
    node.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    return node.url().replace("/%2F", f"/{vhost}")


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class Target:
    """One broker set-up: its URL (list), its queue type and the workers' environment."""

    def __init__(self, name: str, urls: str, queue_type: str, env: dict[str, str]) -> None:
        self.name = name
        self.urls = urls
        self.queue_type = queue_type
        self.env = {**env, f"{PREFIX}AMQP_URL": urls, f"{PREFIX}QUEUE_TYPE": queue_type}
        self.settings = settings_from(self.env)


def claims_for(settings: Settings, count: int) -> tuple[str, list[ClaimRequested]]:
    """A live activity with room for ``count`` claims, and that many claims
    from distinct members (each is credited)."""
    slug = make_activity(settings, f"cb-{uuid.uuid4().hex[:8]}", count, count)
    now = utcnow()
    base = secrets.randbelow(10**7) * 10
    claims = [
        ClaimRequested(
            claim_id=new_claim_id(), activity=slug, phone=f"+86139{(base + i) % 10**8:08d}", requested_at=now
        )
        for i in range(count)
    ]
    return slug, claims


def publish(target: Target, claims: list[ClaimRequested]) -> dict[str, Any]:
    """Confirmed messages/s from one RabbitPublisher, connection and queue
    declarations excluded (the first message is sent before the clock starts)."""
    with RabbitPublisher(target.urls, queue_type=target.queue_type, connect_attempts=10) as publisher:
        publisher.publish_many(claims[:1])
        started = time.monotonic()
        confirmed = publisher.publish_many(claims[1:])
        seconds = time.monotonic() - started
    assert confirmed == len(claims) - 1, f"{confirmed} of {len(claims) - 1} confirmed"
    return {"messages": len(claims) - 1, "seconds": round(seconds, 2), "per_s": round(confirmed / seconds, 1)}


def publish_interleaved(
    batches: list[tuple[Target, list[ClaimRequested]]], chunk: int
) -> dict[str, dict[str, Any]]:
    """Publish every target's claims, ``chunk`` messages to each in turn,
    one RabbitPublisher per target: a burst of load on the machine lands on
    all targets alike. Confirmed messages/s per target, from the time spent
    in its own chunks (connections and declarations excluded)."""
    with contextlib.ExitStack() as stack:
        publishers = [
            stack.enter_context(RabbitPublisher(t.urls, queue_type=t.queue_type, connect_attempts=10))
            for t, _ in batches
        ]
        for publisher, (_, claims) in zip(publishers, batches, strict=True):
            publisher.publish_many(claims[:1])
        seconds = [0.0] * len(batches)
        confirmed = [0] * len(batches)
        longest = max(len(claims) for _, claims in batches)
        for start in range(1, longest, chunk):
            for i, (publisher, (_, claims)) in enumerate(zip(publishers, batches, strict=True)):
                part = claims[start : start + chunk]
                if part:
                    began = time.monotonic()
                    confirmed[i] += publisher.publish_many(part)
                    seconds[i] += time.monotonic() - began
    out = {}
    for i, (target, claims) in enumerate(batches):
        assert confirmed[i] == len(claims) - 1, (
            f"{target.name}: {confirmed[i]} of {len(claims) - 1} confirmed"
        )
        out[target.name] = {
            "messages": confirmed[i],
            "seconds": round(seconds[i], 2),
            "per_s": round(confirmed[i] / seconds[i], 1),
        }
    return out


class Sampler(threading.Thread):
    """(time, claims decided) every ``interval`` seconds."""

    def __init__(self, settings: Settings, slug: str, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.settings, self.slug, self.interval = settings, slug, interval
        self.samples: list[tuple[float, int]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.settings.database_url) as conn:
            while not self.stopping.is_set():
                self.samples.append((time.monotonic(), decided(conn, self.slug)))
                self.stopping.wait(self.interval)

    def last(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def first_decided(self) -> float:
        return next((at for at, done in self.samples if done > 0), time.monotonic())

    def at(self, instant: float) -> int:
        """Claims decided at the last sample no later than ``instant``."""
        return max((done for at, done in self.samples if at <= instant), default=0)

    def stop(self) -> None:
        self.stopping.set()
        self.join()


def drain(
    target: Target, slug: str, count: int, args: argparse.Namespace, during: Any = None
) -> tuple[Sampler, float]:
    """Start the workers on the backlog; return the samples and the instant
    every claim was decided. ``during(sampler)`` runs while they drain."""
    log = args.out / f"workers-{target.queue_type}.log"
    workers = WorkerProcesses(target.env, args.processes, args.threads, log)
    sampler = Sampler(target.settings, slug)
    sampler.start()
    try:
        if during is not None:
            during(sampler)
        deadline = time.monotonic() + args.timeout
        while sampler.last() < count:
            if workers.proc.poll() is not None:
                raise RuntimeError(f"workers exited: {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{target.name}: {sampler.last()} of {count} decided after {args.timeout}s"
                )
            time.sleep(0.2)
        done = next(at for at, n in sampler.samples if n >= count)
    finally:
        sampler.stop()
        workers.stop()
    return sampler, done


def publish_and_drain(targets: list[Target], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One round: the targets' backlogs published interleaved, then drained
    one target after the other."""
    batches = [(t, claims_for(t.settings, args.messages)) for t in targets]
    before = load()
    published = publish_interleaved([(t, claims) for t, (_, claims) in batches], args.chunk)
    results = []
    for target, (slug, claims) in batches:
        drain_before = load()
        sampler, done = drain(target, slug, len(claims), args)
        seconds = done - sampler.first_decided()
        result = {
            "target": target.name,
            "queue_type": target.queue_type,
            "publish": published[target.name],
            "drain": {
                "messages": len(claims),
                "seconds": round(seconds, 2),
                "per_s": round(len(claims) / seconds, 1),
            },
            "load_before": before,
            "load_before_drain": drain_before,
            "load_after": load(),
        }
        console.print(result)
        results.append(result)
    return results


def drain_with_kill(cluster: RabbitCluster, target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """Drain a backlog on the cluster; SIGKILL the claims queue's leader once
    a fifth is decided, restart it after ``--down-seconds``."""
    slug, claims = claims_for(target.settings, args.kill_messages)
    publish(target, claims)
    events: dict[str, Any] = {}
    # Asked before the workers start: rabbitmqctl takes seconds on a busy machine.
    leader = cluster.leader("claims", vhost="q")

    def kill(sampler: Sampler) -> None:
        while sampler.last() < len(claims) // 5:
            time.sleep(0.1)
        events["killed"] = leader.node
        events["load_at_kill"] = load()
        events["kill"] = time.monotonic()
        leader.crash()
        time.sleep(args.down_seconds)
        events["restart"] = time.monotonic()
        leader.start()
        cluster.wait_running(len(cluster.nodes))
        events["back"] = time.monotonic()

    sampler, done = drain(target, slug, len(claims), args, during=kill)
    first, kill_at, back = sampler.first_decided(), events["kill"], events["back"]

    def rate(start: float, end: float) -> float:
        return round((sampler.at(end) - sampler.at(start)) / max(end - start, 1e-9), 1)

    result = {
        "target": "quorum, 3 nodes, claims leader SIGKILLed",
        "messages": len(claims),
        "killed": events["killed"],
        "down_seconds": round(events["restart"] - kill_at, 1),
        "rejoin_seconds": round(back - events["restart"], 1),
        "before_kill_per_s": rate(first, kill_at),
        "node_down_per_s": rate(kill_at, events["restart"]),
        "node_down_and_rejoining_per_s": rate(kill_at, back),
        # None: the backlog was drained before the node was back (a larger --kill-messages).
        "after_rejoin_per_s": round((len(claims) - sampler.at(back)) / (done - back), 1)
        if done > back
        else None,
        "overall_per_s": round(len(claims) / (done - first), 1),
        "load_at_kill": events["load_at_kill"],
        "load_after": load(),
    }
    console.print(result)
    return result


def verify(env: dict[str, str]) -> dict[str, Any]:
    result = subprocess.run(
        [str(Path(sys.executable).with_name("issuance")), "verify", "--json"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def median_target(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One target's rounds, with the median publish and drain rates."""
    return {
        "target": rounds[0]["target"],
        "queue_type": rounds[0]["queue_type"],
        **{
            phase: {"per_s": round(statistics.median(r[phase]["per_s"] for r in rounds), 1)}
            for phase in ("publish", "drain")
        },
        "load_before": rounds[0]["load_before"],
        "load_after": rounds[-1]["load_after"],
        "rounds": rounds,
    }


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    """Every rate over the classic single node's of the same run."""
    reference = results["targets"][0]
    out: dict[str, Any] = {}
    for target in results["targets"][1:]:
        out[target["target"]] = {
            "publish": round(target["publish"]["per_s"] / reference["publish"]["per_s"], 2),
            "drain": round(target["drain"]["per_s"] / reference["drain"]["per_s"], 2),
        }
    kill = results.get("kill")
    if kill:
        out[kill["target"]] = {
            key: None if kill[key] is None else round(kill[key] / reference["drain"]["per_s"], 2)
            for key in (
                "before_kill_per_s",
                "node_down_per_s",
                "node_down_and_rejoining_per_s",
                "after_rejoin_per_s",
                "overall_per_s",
            )
        }
    return out


@contextlib.contextmanager
def brokers(env: dict[str, str], results: dict[str, Any]) -> Iterator[tuple[RabbitCluster, list[Target]]]:
    """The single node (a classic and a quorum vhost) and the 3-node
    cluster (a quorum vhost), all running for the whole measurement, so
    that every target shares the machine with the same processes."""
    base = Path(tempfile.mkdtemp(prefix="issuance-bench-rabbit-"))
    os.chmod(base, 0o755)
    single: PrivateRabbit | None = None
    cluster: RabbitCluster | None = None
    try:
        single = PrivateRabbit(base)
        console.print("starting the 3-node cluster")
        cluster = RabbitCluster()
        results["cluster_start_seconds"] = round(cluster.start_seconds, 1)
        add_vhost(cluster.nodes[0], "q")
        yield (
            cluster,
            [
                Target("classic, 1 node", add_vhost(single, "c"), "classic", env),
                Target("quorum, 1 node", add_vhost(single, "q"), "quorum", env),
                Target(
                    "quorum, 3 nodes",
                    ";".join(n.url().replace("/%2F", "/q") for n in cluster.nodes),
                    "quorum",
                    env,
                ),
            ],
        )
    finally:
        if cluster is not None:
            cluster.close()
        if single is not None:
            single.close()
        shutil.rmtree(base, ignore_errors=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join([".venv/bin/python -m benchmarks.cluster", *sys.argv[1:]]),
        "cpus": os.cpu_count(),
        "load_at_start": load(),
        "workers": f"{args.processes} processes x {args.threads} threads",
        "messages_per_target_and_round": args.messages,
        "rounds": args.rounds,
    }
    with private_database() as env, brokers(env, results) as (cluster, targets):
        # Rounds repeat the targets in turn (their publishing interleaved),
        # so that a change in the machine's load reaches all of them alike.
        rounds: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
        for number in range(args.rounds):
            console.print(f"round {number + 1} of {args.rounds}")
            for target, result in zip(targets, publish_and_drain(targets, args), strict=True):
                rounds[target.name].append(result)
        results["targets"] = [median_target(rounds[t.name]) for t in targets]
        if args.kill_messages:
            results["kill"] = drain_with_kill(cluster, targets[-1], args)
        report = verify({**env, f"{PREFIX}AMQP_URL": "amqp://localhost/"})
    results["verify"] = {"clean": report["clean"], "counts": report["counts"]}
    results["ratios_to_classic_single_node"] = ratios(results)
    results["load_at_end"] = load()
    return results


def summarise(results: dict[str, Any]) -> Table:
    reference = results["targets"][0]
    table = Table(
        title=f"{results['started']}, {results['cpus']} CPUs, load at start {results['load_at_start']}"
    )
    for column in ("measure (median of the rounds)", "msgs/s", "/ classic, 1 node", "load (1, 5, 15 min)"):
        table.add_column(column)
    for target in results["targets"]:
        for phase in ("publish", "drain"):
            rate = target[phase]["per_s"]
            table.add_row(
                f"{phase}: {target['target']}",
                f"{rate:,.0f}",
                f"{rate / reference[phase]['per_s']:.2f}x",
                str(target["load_after"] if phase == "drain" else target["load_before"]),
            )
    kill = results.get("kill")
    if kill:
        for key in (
            "before_kill_per_s",
            "node_down_per_s",
            "node_down_and_rejoining_per_s",
            "after_rejoin_per_s",
        ):
            table.add_row(
                f"drain, quorum 3 nodes, {key.removesuffix('_per_s').replace('_', ' ')}",
                "-" if kill[key] is None else f"{kill[key]:,.0f}",
                "-" if kill[key] is None else f"{kill[key] / reference['drain']['per_s']:.2f}x",
                str(kill["load_at_kill"]),
            )
    return table


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few hundred messages")
    parser.add_argument(
        "--messages", type=int, default=3000, help="claims published and drained per target and round"
    )
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each target, alternated")
    parser.add_argument(
        "--kill-messages", type=int, default=10000, help="claims drained across the node kill"
    )
    parser.add_argument(
        "--down-seconds", type=float, default=10.0, help="how long the killed node stays down"
    )
    parser.add_argument("--chunk", type=int, default=250, help="messages per target in turn while publishing")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    if args.quick:
        args.messages, args.kill_messages, args.down_seconds, args.rounds = 300, 600, 2.0, 1
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    os.chdir(ROOT)
    results = run(args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = args.out / f"cluster-{stamp}.json"
    path.write_text(json.dumps(results, indent=2))
    Console().print(summarise(results))
    Console().print(f"results: {path}; verify clean: {results['verify']['clean']}")
    return 0 if results["verify"]["clean"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
