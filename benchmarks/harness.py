"""What the benchmarks share: a private database, vhost and Redis db on the
real services, workers as subprocesses, and per-process CPU and memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import redis
from issuance.shared.db import database
from issuance.shared.settings import PREFIX, Settings, settings_from

ROOT = Path(__file__).parents[1]
ADMIN_DSN = os.environ.get("ISSUANCE_BENCH_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


@contextmanager
def private_services(tag: str) -> Iterator[tuple[Settings, dict[str, str]]]:
    """A fresh database and vhost named ``tag``, and Redis db 14, dropped after."""
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{tag}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{tag}"')
    subprocess.run(["rabbitmqctl", "-q", "delete_vhost", tag], capture_output=True, timeout=120, check=False)
    rabbitmqctl("add_vhost", tag)
    rabbitmqctl("set_permissions", "-p", tag, "guest", ".*", ".*", ".*")
    env = {
        f"{PREFIX}DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/{tag}",
        f"{PREFIX}AMQP_URL": f"amqp://guest:guest@127.0.0.1:5672/{tag}",
        f"{PREFIX}REDIS_URL": "redis://127.0.0.1:6379/14",
        f"{PREFIX}PHONE_KEY": f"benchmark-phone-key-{tag}",
    }
    settings = settings_from(env)
    redis.Redis.from_url(settings.redis_url).flushdb()
    database.upgrade(settings)
    try:
        yield settings, env
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{tag}" WITH (FORCE)')
        rabbitmqctl("delete_vhost", tag)


class WorkerProcesses:
    """``dramatiq issuance.workers.actors`` as a process tree we can measure and stop."""

    def __init__(
        self,
        env: dict[str, str],
        processes: int,
        threads: int,
        log: Path,
        modules: tuple[str, ...] = (),
        queues: tuple[str, ...] = (),
    ) -> None:
        argv = [sys.executable, "-m", "dramatiq", "issuance.workers.actors", *modules]
        argv += ["-p", str(processes), "-t", str(threads)]
        if queues:
            argv += ["--queues", *queues]
        self.proc = subprocess.Popen(
            argv,
            env={**os.environ, **env},
            cwd=ROOT,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True, check=False)
        return [self.proc.pid, *(int(p) for p in out.stdout.split())]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _stat(pid: int) -> tuple[float, int]:
    """(CPU seconds, peak RSS bytes) of a process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        peak = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
        return cpu, peak
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0, 0


def pgrep(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


class ResourceMeter:
    """CPU seconds spent by the broker, the database, the workers and this
    process between start() and stop(), and the workers' peak RSS."""

    def __init__(self, workers: WorkerProcesses | None) -> None:
        self.workers = workers
        self.start_cpu: dict[str, dict[int, float]] = {}

    def groups(self) -> dict[str, list[int]]:
        groups = {
            "rabbitmq": pgrep("beam.smp"),
            "postgresql": pgrep("postgres"),
            "redis": pgrep("redis-server"),
        }
        if self.workers is not None:
            groups["workers"] = self.workers.pids()
        # This process: the load generator and the observer of an open-loop run.
        groups["benchmark_process"] = [os.getpid()]
        return groups

    def _cpu(self) -> dict[str, dict[int, float]]:
        return {name: {pid: _stat(pid)[0] for pid in pids} for name, pids in self.groups().items()}

    def start(self) -> None:
        self.start_cpu = self._cpu()
        self.started = time.monotonic()

    def stop(self) -> dict[str, Any]:
        """CPU cores used per group: processes alive at the end, counted from
        the start (or from their birth). Processes that exited in between are
        not counted, so the figures are lower bounds."""
        elapsed = time.monotonic() - self.started
        usage: dict[str, Any] = {}
        for name, now in self._cpu().items():
            before = self.start_cpu.get(name, {})
            used = sum(cpu - before.get(pid, 0.0) for pid, cpu in now.items())
            usage[f"{name}_cpu_cores"] = round(used / elapsed, 2)
        if self.workers is not None:
            usage["worker_peak_rss_mb"] = {
                pid: round(_stat(pid)[1] / 2**20, 1) for pid in self.workers.pids() if _stat(pid)[1]
            }
        return usage


def percentiles(conn: psycopg.Connection[Any], claim_ids: list[Any]) -> dict[str, float | None]:
    row = conn.execute(
        """SELECT percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (
                  ORDER BY extract(epoch FROM credited_at - requested_at)),
                  max(extract(epoch FROM credited_at - requested_at))
             FROM claims WHERE claim_id = ANY(%s) AND status = 'credited'""",
        (claim_ids,),
    ).fetchone()
    if row is None or row[0] is None:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    p50, p95, p99 = row[0]
    return {
        "p50_ms": round(p50 * 1000, 1),
        "p95_ms": round(p95 * 1000, 1),
        "p99_ms": round(p99 * 1000, 1),
        "max_ms": round(float(row[1]) * 1000, 1),
    }
