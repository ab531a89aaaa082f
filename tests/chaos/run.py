"""The seeded chaos run: real workers, real (private) services, scheduled faults.

    python -m tests.chaos.run --scale short --seed 1234
    make chaos CHAOS_SCALE=full CHAOS_SEED=1234

One seed fixes the workload (every ID, number, activity, re-send and
batch) and the fault schedule (which fault, on which target, for how long, in
which order), so a failing run is replayed with its seed. Wall-clock timing
and thread interleavings are not under the seed's control.

The run starts its own PostgreSQL, Redis and RabbitMQ (tests.chaos.services)
behind fault proxies (tests.chaos.proxy), two worker process groups (one
armed with each crash point), a producer thread that publishes the workload
with publisher confirms, and walks the fault schedule; after the last fault
it heals everything, waits for every accepted message to reach a final state,
moves dead letters into the store and judges the result with
``issuance verify`` and its own accounting.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from issuance.shared.db import database
from issuance.shared.domain import share_id_for
from issuance.shared.settings import PREFIX, Settings, settings_from
from issuance.shared.wire.messages import (
    ClaimRequested,
    ClaimsRequested,
    Message,
    OrderPlaced,
    ShareOpened,
    utcnow,
)

from tests.chaos.proxy import FaultLoop, FaultProxy
from tests.chaos.services import CHANNEL_TICK_MS, CONSUMER_TIMEOUT_S, PrivateServices, free_port

ROOT = Path(__file__).parents[2]
HEARTBEAT_S = 3  # the workers' AMQP heartbeat; a SIGSTOP lasts well beyond it
# The fault matrix. Each kind, how it is made, is in ChaosRun._inject.
FAULT_TYPES = (
    "worker_kill",  # SIGKILL of a worker process tree
    "worker_stop",  # SIGSTOP past the heartbeat: RabbitMQ drops the connection
    "worker_stop_past_consumer_timeout",  # SIGSTOP, connection kept alive: the consumer timeout acts
    "broker_restart",  # RabbitMQ node kill -9, then a restart
    "db_restart",  # PostgreSQL stopped -m immediate, then a restart
    "db_refuse",  # PostgreSQL up but refusing every connection to the database
    "redis_restart",  # Redis kill -9, then a restart (empty: no persistence)
    "publish_refused",  # a policy makes RabbitMQ refuse publishes to one queue
    "publish_conn_drop",  # the workers' publishing connections closed, consumers kept
    "net_partition",
    "net_reset",
    "net_latency",
    "crash_after_commit_before_ack",
    "crash_after_commit_before_publish",
)
# The queues publish_refused takes turns on: a delay queue, where a failed
# message's retry copy goes, and the separate credit step's queue.
REFUSED_QUEUES = ("claims.DQ", "credits")
# The kinds that publish claims of their own while they hold, so that the
# fault meets work in flight even after the producer is done.
TRAFFIC_KINDS = ("publish_refused", "publish_conn_drop", "db_refuse", "worker_stop_past_consumer_timeout")


@dataclasses.dataclass(frozen=True)
class Scale:
    messages: int  # envelopes the producer publishes (re-sends included)
    rate: float  # envelopes per second
    faults: dict[str, int]
    drain_timeout: float
    warmup_s: float = 10
    db_refuse_s: float = 60


SCALES = {
    "short": Scale(
        messages=2500,
        rate=60,
        # publish_refused twice: once on each of REFUSED_QUEUES.
        faults={t: 1 for t in FAULT_TYPES} | {"worker_kill": 2, "publish_refused": 2},
        drain_timeout=240,
    ),
    # 30,000 envelopes carry over 100,000 business messages (claim batches
    # hold 2 to 29 claims each), at a rate a shared 2-core machine sustains.
    "full": Scale(
        messages=30_000,
        rate=22,
        faults={
            "worker_kill": 50,
            "worker_stop": 6,
            "worker_stop_past_consumer_timeout": 3,
            "broker_restart": 5,
            "db_restart": 5,
            "db_refuse": 3,
            "redis_restart": 5,
            "publish_refused": 4,
            "publish_conn_drop": 3,
            "net_partition": 6,
            "net_reset": 6,
            "net_latency": 6,
            "crash_after_commit_before_ack": 20,
            "crash_after_commit_before_publish": 20,
        },
        drain_timeout=900,
        warmup_s=30,
    ),
}


def _order_status_supported() -> bool:
    """Order status changes are part of the mix once the pipeline has them."""
    try:
        from issuance.shared.wire.messages import MESSAGE_TYPES
    except ImportError:
        return False
    actors = (ROOT / "workers" / "issuance" / "workers" / "actors.py").read_text()
    return "order-status-changed" in MESSAGE_TYPES and "def order_status_changed" in actors


# --------------------------------------------------------------------------- schedule
@dataclasses.dataclass
class Fault:
    kind: str
    target: str
    hold_s: float
    gap_s: float
    started: float = 0.0
    healed: float = 0.0
    recovered: float = 0.0
    recovery_s: float | None = None
    note: str = ""
    evidence: dict[str, int] = dataclasses.field(default_factory=dict)


def fault_schedule(rng: random.Random, scale: Scale) -> list[Fault]:
    kinds = [kind for kind, n in scale.faults.items() for _ in range(n)]
    rng.shuffle(kinds)
    # The refused queues take turns, in a seeded order, so that two faults cover both.
    refused = list(REFUSED_QUEUES)
    rng.shuffle(refused)
    faults = []
    for kind in kinds:
        if kind in ("worker_kill", "worker_stop", "worker_stop_past_consumer_timeout"):
            target = rng.choice(["A", "B"])
        elif kind.startswith("net_"):
            target = rng.choice(["postgres", "redis", "rabbitmq"])
        elif kind.startswith("crash_"):
            target = "A" if kind.endswith("ack") else "B"
        elif kind == "publish_refused":
            target = refused[sum(f.kind == kind for f in faults) % len(refused)]
        elif kind == "publish_conn_drop":
            target = "rabbitmq"
        elif kind.startswith("db_"):
            target = "postgres"
        else:
            target = kind.split("_")[0]
        hold = {
            "worker_stop": HEARTBEAT_S * 3 + rng.uniform(1, 3),
            # Past the timeout and the channel tick that evaluates it.
            "worker_stop_past_consumer_timeout": CONSUMER_TIMEOUT_S
            + CHANNEL_TICK_MS / 1000
            + rng.uniform(8, 12),
            "broker_restart": rng.uniform(1, 4),
            "db_restart": rng.uniform(1, 4),
            "db_refuse": scale.db_refuse_s,
            "redis_restart": rng.uniform(0.5, 2),
            # A delay queue gets a publish only when a message fails: the
            # database refuses meanwhile (see _publish_refused) for longer
            # than the pool's 30 s wait for a connection, so claims do fail.
            "publish_refused": rng.uniform(35, 45) if target.endswith(".DQ") else rng.uniform(12, 20),
            "publish_conn_drop": rng.uniform(8, 15),
            "net_partition": HEARTBEAT_S * 2 + rng.uniform(1, 4),
            "net_latency": rng.uniform(3, 8),
        }.get(kind, 0.0)
        faults.append(Fault(kind, target, round(hold, 2), round(rng.uniform(0.5, 2.5), 2)))
    return faults


# --------------------------------------------------------------------------- workload
class Workload:
    """Seeded message mix: claims (single and batched, some bad numbers, some
    through shares), orders, share opens, order status changes and re-sends
    of the same business key, over hot activities whose pools are smaller
    than demand."""

    def __init__(self, rng: random.Random, total: int, activities: dict[str, str]) -> None:
        self.rng = rng
        self.total = total
        self.activities = activities  # role -> slug
        self.phones = [f"+86139{rng.randrange(10**8):08d}" for _ in range(max(total // 2, 50))]
        self.orders: list[str] = []
        self.sent: list[Message] = []
        self.order_status = _order_status_supported()
        self.produced = 0

    def _uuid(self) -> uuid.UUID:
        return uuid.UUID(int=self.rng.getrandbits(128), version=4)

    def _claim(self) -> ClaimRequested:
        rng = self.rng
        role = rng.choices(["hot", "hot2", "cool", "cool2"], weights=[45, 15, 25, 15])[0]
        phone = rng.choice(self.phones) if rng.random() < 0.97 else f"{rng.randrange(10**5)}"
        share = None
        if self.orders and rng.random() < 0.2:
            share = share_id_for(rng.choice(self.orders))
        return ClaimRequested(
            claim_id=self._uuid(),
            activity=self.activities[role],
            phone=phone,
            requested_at=utcnow(),
            share_id=share,
        )

    def next_batch(self, n: int) -> list[Message]:
        rng = self.rng
        out: list[Message] = []
        while len(out) < n and self.produced < self.total:
            roll = rng.random()
            message: Message
            if roll < 0.05 and self.sent:
                message = rng.choice(self.sent[-2000:])  # a producer re-send: same key, same payload
            elif roll < 0.15:
                order_id = f"SO-{self.rng.getrandbits(48):012x}"
                self.orders.append(order_id)
                message = OrderPlaced(
                    order_id=order_id,
                    member_id=rng.randrange(1, 10**6),
                    amount_cents=rng.randrange(100, 50_000),
                    placed_at=utcnow(),
                    activity=self.activities["cool"],
                )
            elif roll < 0.20 and self.orders:
                message = ShareOpened(
                    event_id=self._uuid(), share_id=share_id_for(rng.choice(self.orders)), opened_at=utcnow()
                )
            elif roll < 0.23 and self.orders and self.order_status:
                from issuance.shared.wire.messages import MESSAGE_TYPES

                changed = MESSAGE_TYPES["order-status-changed"]
                order_id = self.orders[rng.randrange(max(len(self.orders) - 50, 1))]
                message = changed(order_id=order_id, status="paid", changed_at=utcnow())  # type: ignore[call-arg]
            elif roll < 0.40:
                claims = tuple(self._claim() for _ in range(rng.randrange(2, 30)))
                message = ClaimsRequested(batch_id=self._uuid(), claims=claims)
            else:
                message = self._claim()
            out.append(message)
            self.sent.append(message)
            self.produced += 1
        return out


@dataclasses.dataclass
class Ledger:
    """What the producer got confirmed: everything here must reach a final state."""

    envelopes_attempted: int = 0
    envelopes_confirmed: int = 0
    publish_errors: int = 0
    resent_after_error: int = 0
    claims: set[uuid.UUID] = dataclasses.field(default_factory=set)
    claim_messages: int = 0
    orders: set[str] = dataclasses.field(default_factory=set)
    opens: set[uuid.UUID] = dataclasses.field(default_factory=set)
    paid: set[str] = dataclasses.field(default_factory=set)
    by_type: Counter[str] = dataclasses.field(default_factory=Counter)
    probes: int = 0

    def confirm(self, messages: list[Message], *, probe: bool = False) -> None:
        if probe:
            self.probes += len(messages)
        else:
            self.envelopes_confirmed += len(messages)
        for m in messages:
            self.by_type[m.TYPE] += 1
            if isinstance(m, ClaimRequested):
                self.claims.add(m.claim_id)
                self.claim_messages += 1
            elif isinstance(m, ClaimsRequested):
                self.claims.update(c.claim_id for c in m.claims)
                self.claim_messages += len(m.claims)
            elif isinstance(m, OrderPlaced):
                self.orders.add(m.order_id)
            elif isinstance(m, ShareOpened):
                self.opens.add(m.event_id)
            elif m.TYPE == "order-status-changed":
                self.paid.add(m.order_id)  # type: ignore[attr-defined]


class Producer(threading.Thread):
    """Publishes the workload at a steady rate; an unconfirmed batch is
    re-sent (the same messages) until RabbitMQ confirms it."""

    def __init__(self, settings: Settings, workload: Workload, rate: float, ledger: Ledger) -> None:
        super().__init__(name="producer", daemon=True)
        self.settings = settings
        self.workload = workload
        self.rate = rate
        self.ledger = ledger
        self.stop_event = threading.Event()
        self.lock = threading.Lock()

    def publish(self, messages: list[Message], *, probe: bool = False) -> None:
        from issuance.shared.wire.publisher import RabbitPublisher

        first = True
        while not self.stop_event.is_set():
            try:
                with RabbitPublisher.from_settings(self.settings) as publisher:
                    publisher.publish_many(messages)
                with self.lock:
                    self.ledger.confirm(messages, probe=probe)
                return
            except Exception:
                with self.lock:
                    self.ledger.publish_errors += 1
                    if first:
                        self.ledger.resent_after_error += len(messages)
                first = False
                time.sleep(0.5)

    def run(self) -> None:
        tick = 0.5
        per_tick = max(int(self.rate * tick), 1)
        while not self.stop_event.is_set():
            started = time.monotonic()
            batch = self.workload.next_batch(per_tick)
            if not batch:
                return
            with self.lock:
                self.ledger.envelopes_attempted += len(batch)
            self.publish(batch)
            time.sleep(max(tick - (time.monotonic() - started), 0))


# --------------------------------------------------------------------------- workers
class WorkerGroup:
    """One `dramatiq issuance.workers.actors` process tree, armed with one crash point."""

    def __init__(self, name: str, env: dict[str, str], base: Path, fault: str) -> None:
        self.name = name
        self.trigger = base / f"trigger-{name}"
        self.metrics_dir = base / f"metrics-{name}"
        self.metrics_dir.mkdir()
        self.log = base / f"workers-{name}.log"
        self.env = {
            **env,
            f"{PREFIX}FAULT": fault,
            f"{PREFIX}FAULT_TRIGGER": str(self.trigger),
            # The crash before the credit publish needs the separate credit
            # step; the other group credits inline: both paths face the faults.
            f"{PREFIX}CREDIT_INLINE": "false" if fault == "after_commit_before_publish" else "true",
            f"{PREFIX}METRICS_PORT": str(free_port()),
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.stopped = False
        self.duplicates_banked = 0.0
        self.duplicates_now = 0.0
        self.start()

    def start(self) -> None:
        self.duplicates_banked += self.duplicates_now
        self.duplicates_now = 0.0
        argv = [sys.executable, "-m", "dramatiq", "issuance.workers.actors", "-p", "1", "-t", "4"]
        self.proc = subprocess.Popen(
            argv,
            env=self.env,
            cwd=ROOT,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.starts += 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(timeout=30)

    def scrape(self) -> None:
        port = self.env[f"{PREFIX}METRICS_PORT"]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
                text = response.read().decode()
        except OSError:
            return
        total = sum(
            float(m.group(1))
            for m in re.finditer(r"^issuance_duplicates_suppressed_total\{[^}]*\} (\S+)$", text, re.M)
        )
        self.duplicates_now = max(self.duplicates_now, total)

    def duplicates(self) -> float:
        return self.duplicates_banked + self.duplicates_now

    def stop(self) -> None:
        if self.alive():
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                assert self.proc is not None
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


class Supervisor(threading.Thread):
    """Restarts a worker group that died (killed, crashed), like systemd would."""

    def __init__(self, groups: list[WorkerGroup]) -> None:
        super().__init__(name="supervisor", daemon=True)
        self.groups = groups
        self.stop_event = threading.Event()
        self.restarted_at: dict[str, float] = {}

    def run(self) -> None:
        tick = 0
        while not self.stop_event.wait(0.25):
            for g in self.groups:
                if not g.alive() and not g.stopped:
                    assert g.proc is not None
                    # The crash point killed one process; take the rest of the tree down too.
                    g.signal(signal.SIGKILL)
                    time.sleep(0.5)
                    g.start()
                    self.restarted_at[g.name] = time.monotonic()
            tick += 1
            if tick % 4 == 0:
                for g in self.groups:
                    g.scrape()


# --------------------------------------------------------------------------- the run
@dataclasses.dataclass
class Result:
    seed: int
    scale: str
    report: dict[str, Any]

    @property
    def ok(self) -> bool:
        r = self.report
        return bool(
            r["lost"]["total"] == 0
            and r["duplicate_effects"]["total"] == 0
            and r["verify"]["clean"]
            and r["verify"]["cli_exit"] == 0
            and all(f["recovery_s"] is not None for f in r["faults"])
        )


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(int(q * len(ordered)), len(ordered) - 1)], 3)


class ChaosRun:
    def __init__(self, seed: int, scale: str, *, messages: int | None = None, log: Any = print) -> None:
        self.seed = seed
        self.scale_name = scale
        base = SCALES[scale]
        self.scale = dataclasses.replace(base, messages=messages) if messages else base
        self.rng = random.Random(seed)
        self.log = log
        self.faults = fault_schedule(random.Random(seed ^ 0x5EED), self.scale)
        # Phones of the claims the faults publish themselves (not the workload's rng).
        self.traffic_rng = random.Random(seed ^ 0x7AFF1C)

    # -- set-up -----------------------------------------------------------------
    def _setup(self) -> None:
        self.services = PrivateServices()
        s = self.services
        self.loop = FaultLoop()
        self.proxies = {
            "postgres": FaultProxy(self.loop, "postgres", free_port(), s.postgres.port),
            "redis": FaultProxy(self.loop, "redis", free_port(), s.redis.port),
            "rabbitmq": FaultProxy(self.loop, "rabbitmq", free_port(), s.rabbit.port, amqp=True),
        }
        common = {
            f"{PREFIX}PHONE_KEY": f"chaos-phone-key-{self.seed}",
            f"{PREFIX}MIN_BACKOFF_MS": "100",
            f"{PREFIX}MAX_BACKOFF_MS": "2000",
        }
        # The producer and the judge talk to the services directly; the workers
        # go through the fault proxies.
        self.direct_env = {
            f"{PREFIX}DATABASE_URL": s.postgres.url(),
            f"{PREFIX}REDIS_URL": s.redis.url(),
            f"{PREFIX}AMQP_URL": s.rabbit.url(),
            **common,
        }
        self.settings = settings_from(self.direct_env)
        worker_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(PREFIX)},
            f"{PREFIX}DATABASE_URL": s.postgres.url(port=self.proxies["postgres"].listen_port),
            f"{PREFIX}REDIS_URL": s.redis.url(port=self.proxies["redis"].listen_port),
            f"{PREFIX}AMQP_URL": s.rabbit.url(
                port=self.proxies["rabbitmq"].listen_port, heartbeat=HEARTBEAT_S
            ),
            **common,
        }
        database.upgrade(self.settings)
        self._activities()
        self.groups = [
            WorkerGroup("A", worker_env, s.base, "after_commit_before_ack"),
            WorkerGroup("B", worker_env, s.base, "after_commit_before_publish"),
        ]
        self.supervisor = Supervisor(self.groups)
        self.supervisor.start()
        self._wait(self._consuming, 90, "workers consuming")

    def _activities(self) -> None:
        from tests.conftest import make_activity

        n = self.scale.messages
        claims = int(n * 0.75 * 4)  # claims per envelope, batches included (rough)
        # Hot activities: far less budget than demand, and a code pool smaller
        # than the budget, so sold_out and pool_empty both happen.
        specs = {
            "hot": {"budget": max(claims // 12, 20), "codes": max(claims // 16, 15), "group": "g-hot"},
            "hot2": {"budget": max(claims // 40, 10), "codes": max(claims // 40, 10), "group": "g-hot"},
            "cool": {"budget": claims, "codes": claims, "templates": 2},
            "cool2": {"budget": claims // 3, "codes": claims // 3},
            # Probes, and the claims the TRAFFIC_KINDS publish (about 4 a second while they hold).
            "probe": {
                "budget": (probes := 3000 + 600 * sum(self.scale.faults.get(k, 0) for k in TRAFFIC_KINDS)),
                "codes": probes,
            },
        }
        self.activities = {}
        for role, spec in specs.items():
            made = make_activity(self.settings, slug=f"{role}-{self.seed % 10**6}", **spec)  # type: ignore[arg-type]
            self.activities[role] = made["slug"]

    def _consuming(self) -> bool:
        out = self.services.rabbit.ctl("list_queues", "-q", "name", "consumers", check=False).stdout
        counts = dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)
        return int(counts.get("claims", "0")) >= len(self.groups)

    def _wait(self, check: Any, timeout: float, what: str) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            try:
                if check():
                    return time.monotonic() - start
            except Exception:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}")

    def _db(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.settings.database_url, connect_timeout=5)

    # -- probes ------------------------------------------------------------------
    def _probe(self, timeout: float = 240) -> float | None:
        """Publish a claim and wait for its credit: seconds until the pipeline
        works end to end again."""
        start = time.monotonic()
        probe = ClaimRequested(
            claim_id=uuid.uuid4(),
            activity=self.activities["probe"],
            phone=f"+86137{self.rng.randrange(10**8):08d}",
            requested_at=utcnow(),
        )
        self.producer.publish([probe], probe=True)
        deadline = start + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(psycopg.Error), self._db() as conn:
                row = conn.execute(
                    "SELECT status FROM claims WHERE claim_id = %s", (probe.claim_id,)
                ).fetchone()
                if row and row[0] == "credited":
                    return time.monotonic() - start
            time.sleep(0.1)
        return None

    # -- faults --------------------------------------------------------------------
    def _inject(self, fault: Fault) -> None:
        s = self.services
        kind, target = fault.kind, fault.target
        group = next((g for g in self.groups if g.name == target), None)
        if kind == "worker_kill":
            assert group is not None
            group.kill()  # the supervisor restarts it
        elif kind == "worker_stop":
            assert group is not None
            group.stopped = True
            group.signal(signal.SIGSTOP)
            time.sleep(fault.hold_s)
            group.signal(signal.SIGCONT)
            group.stopped = False
        elif kind == "broker_restart":
            s.rabbit.crash()
            time.sleep(fault.hold_s)
            s.rabbit.start()
        elif kind == "db_restart":
            s.postgres.crash()
            time.sleep(fault.hold_s)
            s.postgres.start()
        elif kind == "redis_restart":
            s.redis.crash()
            time.sleep(fault.hold_s)
            s.redis.start()
        elif kind == "net_partition":
            self.proxies[target].partition(fault.hold_s)
            time.sleep(fault.hold_s)
        elif kind == "net_reset":
            fault.note = f"{self.proxies[target].reset()} connections reset"
        elif kind == "net_latency":
            self.proxies[target].latency(rng_ms := 150 + 50 * (len(fault.target) % 3), fault.hold_s)
            fault.note = f"{rng_ms} ms per chunk"
            time.sleep(fault.hold_s)
        elif kind in TRAFFIC_KINDS:
            with self._traffic(fault):
                getattr(self, f"_{kind}")(fault)
        elif kind.startswith("crash_"):
            assert group is not None
            starts = group.starts
            group.trigger.touch()
            # Traffic reaches the crash point; probes make sure some does.
            deadline = time.monotonic() + 120
            while group.trigger.exists() and time.monotonic() < deadline:
                self.producer.publish(
                    [
                        ClaimRequested(
                            claim_id=uuid.uuid4(),
                            activity=self.activities["probe"],
                            phone=f"+86136{self.rng.randrange(10**8):08d}",
                            requested_at=utcnow(),
                        )
                    ],
                    probe=True,
                )
                time.sleep(0.3)
            if group.trigger.exists():
                group.trigger.unlink(missing_ok=True)
                fault.note = "crash point not reached"
            else:
                self._wait(lambda: group.starts > starts and group.alive(), 60, "the crashed group restarted")
                fault.note = "fired"
        else:
            raise ValueError(kind)

    # -- the faults that hold with traffic of their own ----------------------------
    @contextlib.contextmanager
    def _traffic(self, fault: Fault, per_s: float = 4) -> Any:
        """Claims published (with confirms, to the probe activity) while the
        fault holds; they are in the ledger like the workload's and must end
        credited or refused like them."""
        stop = threading.Event()
        sent = 0

        def publish() -> None:
            nonlocal sent
            while not stop.wait(1 / per_s):
                claim = ClaimRequested(
                    claim_id=uuid.UUID(int=self.traffic_rng.getrandbits(128), version=4),
                    activity=self.activities["probe"],
                    phone=f"+86135{self.traffic_rng.randrange(10**8):08d}",
                    requested_at=utcnow(),
                )
                self.producer.publish([claim], probe=True)
                sent += 1

        thread = threading.Thread(target=publish, name="fault-traffic", daemon=True)
        handed_back = self._worker_log_count("retry copy was not confirmed")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=60)
            fault.evidence["claims_sent_during_fault"] = sent
            fault.evidence["deliveries_handed_back"] = (
                self._worker_log_count("retry copy was not confirmed") - handed_back
            )

    def _worker_log_count(self, needle: str) -> int:
        return sum(g.log.read_text(errors="replace").count(needle) for g in self.groups if g.log.exists())

    def _publish_refused(self, fault: Fault) -> None:
        """A RabbitMQ policy (max-length 0, overflow reject-publish) on one
        queue: the broker nacks every publish to it until the policy is
        cleared. The workers must keep every delivery whose follow-up
        (retry copy, credit message) was refused."""
        s = self.services
        s.rabbit.set_policy(
            "chaos-refuse", f"^{re.escape(fault.target)}$", {"max-length": 0, "overflow": "reject-publish"}
        )
        try:
            if fault.target.endswith(".DQ"):
                # Only a failed message goes to a delay queue: the database
                # refuses connections meanwhile, so every claim in flight
                # fails, and its retry copy is refused.
                fault.evidence["db_sessions_ended"] = s.postgres.refuse_connections()
                try:
                    time.sleep(fault.hold_s)
                finally:
                    s.postgres.allow_connections()
            else:
                time.sleep(fault.hold_s)
        finally:
            s.rabbit.clear_policy("chaos-refuse")
        fault.note = f"publishes to {fault.target} refused"

    def _publish_conn_drop(self, fault: Fault) -> None:
        """The connections the workers publish on are closed by the broker
        (``rabbitmqctl close_connection``), again and again while the fault
        holds, while their consuming connections stay open: Dramatiq consumes
        on a connection per consumer and publishes on one per thread, so a
        connection with no consumer on any of its channels is a publishing
        one. Only the workers' connections are touched: they are the ones
        that negotiated the workers' heartbeat (the producer's and the
        judge's use the default)."""
        rabbit = self.services.rabbit
        consumers_before = rabbit.consuming_connections()
        closed = 0
        deadline = time.monotonic() + fault.hold_s
        while time.monotonic() < deadline:
            for pid in rabbit.publishing_connections(HEARTBEAT_S):
                closed += rabbit.close_connection(pid, "chaos: publishing connection dropped")
            time.sleep(0.3)
        kept = len(consumers_before & rabbit.consuming_connections())
        fault.evidence |= {"publishing_connections_closed": closed, "consuming_connections_kept": kept,
                           "consuming_connections_before": len(consumers_before)}  # fmt: skip
        fault.note = (
            f"{closed} publishing connections closed; {kept}/{len(consumers_before)} consuming ones kept"
        )

    def _db_refuse(self, fault: Fault) -> None:
        """PostgreSQL stays up but refuses every connection to the database
        (``ALLOW_CONNECTIONS false``) and ends the open sessions, for
        ``hold_s`` (60 s at both scales), then accepts them again."""
        pg = self.services.postgres
        fault.evidence["db_sessions_ended"] = pg.refuse_connections()
        try:
            time.sleep(fault.hold_s)
        finally:
            pg.allow_connections()
        fault.note = f"{fault.evidence['db_sessions_ended']} sessions ended, connections refused"

    def _worker_stop_past_consumer_timeout(self, fault: Fault) -> None:
        """A worker group frozen (SIGSTOP) longer than the broker's consumer
        timeout while its connections stay alive: the fault proxy sends AMQP
        heartbeats on the frozen clients' behalf, so RabbitMQ does not drop
        the connection (as it does in worker_stop) but closes the consumer's
        channel when its oldest delivery has waited CONSUMER_TIMEOUT_S for an
        ack, and delivers its messages to the other group. After SIGCONT the
        group finishes the messages it held and must not settle them on the
        closed channel, nor apply them twice."""
        group = next(g for g in self.groups if g.name == fault.target)
        rabbit, proxy = self.services.rabbit, self.proxies["rabbitmq"]
        # A group the previous fault cut off reconnects a few seconds later
        # (Dramatiq's consumer restart delay); frozen before that, it holds no
        # delivery the timeout could act on. Freeze a consuming group.
        waited = self._wait(self._consuming, 60, "both groups consuming before the freeze")
        fault.evidence["waited_for_consumers_ms"] = round(waited * 1000)
        timeouts = rabbit.timed_out_channels()
        heartbeats = proxy.heartbeats_sent
        proxy.keepalive(fault.hold_s + 5)
        group.stopped = True
        group.signal(signal.SIGSTOP)
        try:
            time.sleep(fault.hold_s)
        finally:
            group.signal(signal.SIGCONT)
            group.stopped = False
            proxy.keepalive(0)
        fault.evidence["channels_closed_by_consumer_timeout"] = len(rabbit.timed_out_channels() - timeouts)
        fault.evidence["heartbeats_sent_for_the_frozen"] = proxy.heartbeats_sent - heartbeats
        fault.note = (
            f"{fault.evidence['channels_closed_by_consumer_timeout']} channels closed by the consumer timeout"
        )

    def _walk_schedule(self) -> None:
        for n, fault in enumerate(self.faults, 1):
            time.sleep(fault.gap_s)
            fault.started = time.time()
            timeouts = self.services.rabbit.timed_out_channels()
            self._inject(fault)
            fault.healed = time.time()
            # Any fault may hold deliveries past the consumer timeout (a worker
            # waiting out an outage with messages prefetched): say where it did.
            if closed := self.services.rabbit.timed_out_channels() - timeouts:
                fault.evidence["channels_closed_by_consumer_timeout"] = len(closed)
            fault.recovery_s = self._probe()
            fault.recovered = time.time()
            self.log(
                f"  fault {n:3d}/{len(self.faults)} {fault.kind:34s} {fault.target:9s}"
                f" hold {fault.hold_s:5.1f}s  recovered in"
                f" {fault.recovery_s if fault.recovery_s is None else round(fault.recovery_s, 2)}s"
                f" {fault.note}"
            )

    # -- the judge -----------------------------------------------------------------
    def _unfinished(self) -> dict[str, int]:
        ledger = self.ledger
        with self._db() as conn:
            final = {
                r[0]
                for r in conn.execute("SELECT claim_id FROM claims WHERE status IN ('credited', 'refused')")
            }
            shares = {r[0] for r in conn.execute("SELECT order_id FROM shares")}
            opens = {r[0] for r in conn.execute("SELECT event_id FROM share_opens")}
            dead = self._dead_lettered_claims(conn)
            paid: set[str] = set()
            if ledger.paid:
                with contextlib.suppress(psycopg.Error):
                    paid = {
                        r[0] for r in conn.execute("SELECT order_id FROM orders WHERE status <> 'placed'")
                    }
        return {
            # A claim in the dead-letter store (its message refused with a
            # reason) is accounted for there, not lost; see dead_lettered_claims.
            "claims": len(ledger.claims - final - set(dead)),
            "orders": len(ledger.orders - shares),
            "share_opens": len(ledger.opens - opens),
            "order_status": len(ledger.paid - paid),
        }

    @staticmethod
    def _dead_lettered_claims(conn: psycopg.Connection[Any]) -> dict[uuid.UUID, bool]:
        """Claims whose message ended in the dead-letter store: claim ID ->
        whether the claim itself was well-formed (then its batch took it down)."""
        found: dict[uuid.UUID, bool] = {}
        rows = conn.execute("SELECT body, detail FROM dead_letters WHERE queue = 'claims'").fetchall()
        for body, detail in rows:
            try:
                payload = json.loads(body)
            except ValueError:
                continue
            items = payload.get("claims") if isinstance(payload, dict) else None
            # The refusal names the claim of the batch that was malformed.
            bad = re.search(r"claim (\d+):", detail or "")
            for n, item in enumerate(items if isinstance(items, list) else [payload]):
                try:
                    claim_id = uuid.UUID(str(item.get("claim_id"))) if isinstance(item, dict) else None
                except ValueError:
                    claim_id = None
                if claim_id is not None:
                    found[claim_id] = isinstance(items, list) and not (bad and int(bad.group(1)) == n)
        return found

    def _duplicate_effects(self, conn: psycopg.Connection[Any]) -> dict[str, int]:
        queries = {
            "codes_bound_twice": """
                SELECT code FROM wallet_ledger GROUP BY code HAVING count(DISTINCT claim_id) > 1""",
            "two_packages_per_member_activity": """
                SELECT activity_id, member_id FROM claims WHERE status <> 'refused'
                 GROUP BY activity_id, member_id HAVING count(*) > 1""",
            "credits_applied_twice": """
                SELECT claim_id, code FROM wallet_ledger GROUP BY 1, 2 HAVING count(*) > 1""",
            "more_credits_than_codes": """
                SELECT w.claim_id FROM wallet_ledger w GROUP BY w.claim_id
                HAVING count(*) > (SELECT count(*) FROM codes c WHERE c.claim_id = w.claim_id)""",
            "two_shares_per_order": "SELECT order_id FROM shares GROUP BY order_id HAVING count(*) > 1",
        }
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        if {"rebates", "referrals"} <= tables:
            queries["rebates_twice"] = """
                SELECT r.referrer_member_id, r.activity_id FROM rebates r GROUP BY 1, 2
                HAVING count(*) > (SELECT count(*) FROM referrals f
                                    WHERE f.referrer_member_id = r.referrer_member_id
                                      AND f.activity_id = r.activity_id)"""
        out = {name: len(conn.execute(sql).fetchall()) for name, sql in queries.items()}
        out["total"] = sum(out.values())
        return out

    def _latency(self, conn: psycopg.Connection[Any]) -> dict[str, Any]:
        rows = conn.execute(
            """SELECT k.requested_at, k.credited_at FROM claims k JOIN activities a USING (activity_id)
                WHERE k.status = 'credited' AND a.slug <> %s""",
            (self.activities["probe"],),
        ).fetchall()
        windows = [
            (datetime.fromtimestamp(f.started, UTC), datetime.fromtimestamp(f.recovered, UTC))
            for f in self.faults
        ]
        quiet: list[float] = []
        faulty: list[float] = []
        for requested, credited in rows:
            latency = (credited - requested).total_seconds()
            hit = any(requested <= end and credited >= start for start, end in windows)
            (faulty if hit else quiet).append(latency)

        def summary(values: list[float]) -> dict[str, Any]:
            return {
                "claims": len(values),
                "p50_s": percentile(values, 0.5),
                "p99_s": percentile(values, 0.99),
                "max_s": round(max(values), 3) if values else None,
            }

        return {"without_faults": summary(quiet), "with_faults": summary(faulty)}

    def _judge(self, drain_s: float) -> dict[str, Any]:
        from issuance.shared.db.dead_letters import drain
        from issuance.shared.db.verify import verify

        with database.pool(self.settings, max_size=1) as pool:
            drain(self.settings, pool)
        cli = subprocess.run(
            [sys.executable, "-m", "issuance.shared.cli", "verify", "--json"],
            env={**os.environ, **self.direct_env},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        lost = self._unfinished()
        lost["total"] = sum(lost.values())
        with self._db() as conn:
            dead_claims = self._dead_lettered_claims(conn)
            in_ledger = {c: ok for c, ok in dead_claims.items() if c in self.ledger.claims}
            report = verify(conn)
            dead = conn.execute(
                "SELECT queue, reason, count(*), min(left(detail, 160)) FROM dead_letters"
                " GROUP BY 1, 2 ORDER BY 3 DESC"
            ).fetchall()
            duplicates = self._duplicate_effects(conn)
            latency = self._latency(conn)
            states = dict(conn.execute("SELECT status, count(*) FROM claims GROUP BY status").fetchall())
        faults_by_type = Counter(f.kind for f in self.faults)
        recoveries = [f.recovery_s for f in self.faults if f.recovery_s is not None]
        by_kind: dict[str, list[float]] = {}
        for f in self.faults:
            if f.recovery_s is not None:
                by_kind.setdefault(f.kind, []).append(f.recovery_s)
        ledger = self.ledger
        return {
            "seed": self.seed,
            "scale": self.scale_name,
            "messages": {
                "envelopes_injected": ledger.envelopes_attempted,
                "envelopes_confirmed": ledger.envelopes_confirmed,
                "claims_in_confirmed_envelopes": ledger.claim_messages,
                "business_messages_confirmed": ledger.claim_messages
                + sum(n for t, n in ledger.by_type.items() if not t.startswith("claim")),
                "distinct_claims": len(ledger.claims),
                "orders": len(ledger.orders),
                "share_opens": len(ledger.opens),
                "order_status_changes": len(ledger.paid),
                "confirmed_by_type": dict(ledger.by_type),
                "publish_errors_then_resent": ledger.publish_errors,
                "probe_claims": ledger.probes,
                "order_status_in_mix": self.workload.order_status,
            },
            "claim_states": {k: int(v) for k, v in states.items()},
            "faults_by_type": dict(faults_by_type),
            "faults_total": len(self.faults),
            "crash_points_fired": Counter(f.kind for f in self.faults if f.note == "fired"),
            "worker_group_starts": {g.name: g.starts for g in self.groups},
            "duplicate_deliveries_seen": int(sum(g.duplicates() for g in self.groups)),
            "duplicate_effects": duplicates,
            "lost": lost,
            # Claims that reached the dead-letter store with their message. A
            # claims-requested batch is validated as a whole: one malformed
            # claim dead-letters the well-formed claims packed with it.
            "dead_lettered_claims": {
                "total": len(in_ledger),
                "well_formed_but_in_a_refused_batch": sum(in_ledger.values()),
            },
            "latency": latency,
            "recovery_s": {
                kind: {"p50": percentile(v, 0.5), "max": round(max(v), 2)}
                for kind, v in sorted(by_kind.items())
            },
            "recovery_max_s": round(max(recoveries), 2) if recoveries else None,
            "faults": [
                {
                    "kind": f.kind,
                    "target": f.target,
                    "hold_s": f.hold_s,
                    "recovery_s": None if f.recovery_s is None else round(f.recovery_s, 2),
                    "note": f.note,
                    "evidence": f.evidence,
                }
                for f in self.faults
            ],
            "drain_s": round(drain_s, 1),
            "dead_letters": [{"queue": q, "reason": r, "count": int(n), "example": d} for q, r, n, d in dead],
            "verify": {
                "clean": report.clean,
                "breaches": {k: len(v) for k, v in report.breaches.items() if v},
                "counts": report.counts,
                "cli_exit": cli.returncode,
                "cli_tail": cli.stdout[-300:] + cli.stderr[-300:],
            },
        }

    def run(self) -> Result:
        self.log(f"chaos run: seed {self.seed}, scale {self.scale_name}, {self.scale.messages} envelopes,"
                 f" {len(self.faults)} faults")  # fmt: skip
        started = time.monotonic()
        self._setup()
        try:
            self.log(f"  private services under {self.services.base}; workers A and B consuming")
            self.ledger = Ledger()
            self.workload = Workload(self.rng, self.scale.messages, self.activities)
            self.producer = Producer(self.settings, self.workload, self.scale.rate, self.ledger)
            self.producer.start()
            time.sleep(self.scale.warmup_s)  # a quiet stretch: the latency baseline without faults
            self._walk_schedule()
            self.log(f"  schedule done after {time.monotonic() - started:.0f}s; healing and draining")
            for proxy in self.proxies.values():
                proxy.heal()
            self.producer.join()
            drain_start = time.monotonic()
            with contextlib.suppress(TimeoutError):
                self._wait(
                    lambda: not any(self._unfinished().values()),
                    self.scale.drain_timeout,
                    "every message final",
                )
            report = self._judge(time.monotonic() - drain_start)
            report["duration_s"] = round(time.monotonic() - started, 1)
            return Result(self.seed, self.scale_name, report)
        finally:
            self._teardown()

    def _teardown(self) -> None:
        with contextlib.suppress(Exception):
            self.producer.stop_event.set()
        self.supervisor.stop_event.set()
        self.supervisor.join(timeout=5)
        for g in self.groups:
            with contextlib.suppress(Exception):
                g.stop()
        for proxy in self.proxies.values():
            with contextlib.suppress(Exception):
                proxy.close()
        self.loop.stop()
        self.worker_logs = {g.name: g.log.read_text(errors="replace") for g in self.groups}
        self.services.close()


def render(result: Result) -> str:
    r = result.report
    lines = [
        f"seed {r['seed']} scale {r['scale']} in {r['duration_s']}s (drain {r['drain_s']}s)",
        f"messages: {json.dumps(r['messages'])}",
        f"claim states: {r['claim_states']}",
        f"faults ({r['faults_total']}): {r['faults_by_type']}",
        f"crash points fired: {dict(r['crash_points_fired'])}",
        f"worker group starts: {r['worker_group_starts']}",
        f"duplicate deliveries seen (suppressed, at least): {r['duplicate_deliveries_seen']}",
        f"duplicate effects: {r['duplicate_effects']}",
        f"lost: {r['lost']}",
        f"claims dead-lettered with their message: {r['dead_lettered_claims']}",
        f"latency claim->credit: {r['latency']}",
        f"recovery by fault type (s): {r['recovery_s']}",
        "dead letters: "
        + (", ".join(f"{d['queue']}/{d['reason']}={d['count']}" for d in r["dead_letters"]) or "none"),
        f"verify: {(r['verify']['clean'] and 'clean') or 'BREACHES ' + str(r['verify']['breaches'])},"
        f" issuance verify exit {r['verify']['cli_exit']}",
        *fault_matrix(r),
        "RESULT: " + ("PASS" if result.ok else "FAIL"),
    ]
    return "\n".join(lines)


def fault_matrix(r: dict[str, Any]) -> list[str]:
    """One line per fault kind: how many, on what, recovery, and what each
    fault did (its evidence summed). The run's verdict (lost, doubled,
    verify) is over all of them together."""
    lines = ["fault matrix (kind: count, targets, recovery p50/max s, evidence):"]
    for kind in FAULT_TYPES:
        faults = [f for f in r["faults"] if f["kind"] == kind]
        if not faults:
            lines.append(f"  {kind:34s} not scheduled")
            continue
        targets = ",".join(sorted({f["target"] for f in faults}))
        recovery = r["recovery_s"].get(kind, {})
        evidence: Counter[str] = Counter()
        for f in faults:
            evidence.update(f.get("evidence") or {})
        lines.append(
            f"  {kind:34s} {len(faults):3d}  {targets:24s} {recovery.get('p50')}/{recovery.get('max')}"
            + (f"  {dict(evidence)}" if evidence else "")
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.run", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: a fresh random seed)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="short")
    parser.add_argument("--messages", type=int, default=None, help="override the scale's envelope count")
    parser.add_argument("--json", type=Path, default=None, help="write the full report here")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"seed: {seed}  (replay: make chaos CHAOS_SCALE={args.scale} CHAOS_SEED={seed})", flush=True)
    result = ChaosRun(seed, args.scale, messages=args.messages, log=lambda s: print(s, flush=True)).run()
    print(render(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result.report, indent=2, default=str))
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
