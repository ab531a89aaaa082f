"""What the benchmarks share: a private database, vhost and Redis db on the
real services, workers as subprocesses, and per-process CPU and memory."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psycopg
import redis
from issuance.shared.db import database
from issuance.shared.settings import PREFIX, Settings, settings_from

ROOT = Path(__file__).parents[1]
PG_BIN = Path(os.environ.get("ISSUANCE_BENCH_PG_BIN", "/usr/lib/postgresql/15/bin"))
ADMIN_DSN = os.environ.get("ISSUANCE_BENCH_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


@contextmanager
def private_services(tag: str, admin_dsn: str = ADMIN_DSN) -> Iterator[tuple[Settings, dict[str, str]]]:
    """A fresh database (on the PostgreSQL of ``admin_dsn``) and vhost named
    ``tag``, and Redis db 14, dropped after."""
    server = admin_dsn.rsplit("/", 1)[0]
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{tag}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{tag}"')
    subprocess.run(["rabbitmqctl", "-q", "delete_vhost", tag], capture_output=True, timeout=120, check=False)
    rabbitmqctl("add_vhost", tag)
    rabbitmqctl("set_permissions", "-p", tag, "guest", ".*", ".*", ".*")
    env = {
        f"{PREFIX}DATABASE_URL": f"{server}/{tag}",
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
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{tag}" WITH (FORCE)')
        rabbitmqctl("delete_vhost", tag)


# -- a private PostgreSQL with production-like settings ---------------------------
def machine_memory() -> int:
    total = _meminfo("MemTotal") * 1024
    if not total:
        raise RuntimeError("no MemTotal in /proc/meminfo")
    return total


def _meminfo(key: str) -> int:
    """A figure of /proc/meminfo (kB, or pages for the HugePages_ lines); 0 when absent."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    return 0


def production_settings(memory: int, cores: int) -> dict[str, str]:
    """A production configuration for a dedicated box of ``memory`` bytes and
    ``cores`` cores (the usual rules of thumb; nothing is tuned to the run)."""
    mb = memory // 2**20
    return {
        "shared_buffers": f"{mb // 6}MB",
        "effective_cache_size": f"{mb * 2 // 3}MB",
        "maintenance_work_mem": f"{min(mb // 16, 2048)}MB",
        "work_mem": "16MB",
        "wal_buffers": "16MB",
        "max_connections": "100",
        "synchronous_commit": "on",
        "fsync": "on",
        "full_page_writes": "on",
        # Huge pages for the shared memory where the kernel has them to give
        # (PrivatePostgres reserves them; reported as huge_pages_in_use).
        "huge_pages": "try",
        "wal_compression": "lz4",  # cheaper on the CPU than pglz ("on") for the same full-page images
        "checkpoint_timeout": "15min",
        "checkpoint_completion_target": "0.9",
        "max_wal_size": "8GB",
        "min_wal_size": "1GB",
        "random_page_cost": "1.1",
        "effective_io_concurrency": "200",
        "max_worker_processes": str(max(cores, 2)),
        "max_parallel_workers": str(max(cores, 2)),
        "max_parallel_workers_per_gather": str(max(cores // 2, 1)),
        "autovacuum": "on",
        "autovacuum_max_workers": "3",
        "autovacuum_naptime": "30s",
        # Large tables: a fixed share of 20% (the default) lets a 10M-row
        # table collect 2M dead rows before vacuum; 2% and 1% keep it close.
        "autovacuum_vacuum_scale_factor": "0.02",
        "autovacuum_vacuum_insert_scale_factor": "0.05",
        "autovacuum_analyze_scale_factor": "0.01",
        "autovacuum_vacuum_cost_limit": "2000",
        "log_autovacuum_min_duration": "0",
        "log_checkpoints": "on",
        "track_io_timing": "on",
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivatePostgres:
    """A PostgreSQL instance of our own under ``base``, stopped on close()."""

    def __init__(self, base: Path, conf: dict[str, str], db: str | None = None) -> None:
        self.dir = base
        self.data = base / "data"
        self.port = free_port()
        self.conf = conf
        as_postgres = os.geteuid() == 0
        self.prefix = ["runuser", "-u", "postgres", "--"] if as_postgres else []
        if as_postgres:
            shutil.chown(base, "postgres", "postgres")
        subprocess.run(
            [*self.prefix, str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"],
            check=True,
            capture_output=True,
            timeout=300,
        )
        lines = [f"{key} = '{value}'" for key, value in conf.items()]
        lines += [
            f"port = {self.port}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{base}'",
        ]
        with (self.data / "postgresql.conf").open("a") as f:
            f.write("\n# benchmarks\n" + "\n".join(lines) + "\n")
        self.huge_pages = HugePages(self._huge_pages_needed()) if conf.get("huge_pages") == "try" else None
        try:
            self._ctl("-l", str(base / "log"), "-w", "-t", "120", "start")
        except BaseException:
            if self.huge_pages is not None:
                self.huge_pages.release()
            raise
        if self.huge_pages is not None:
            self.huge_pages.check_taken()
        self.db = db or "postgres"
        if db is not None:
            with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{db}"')

    def _ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.prefix, str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args],
            check=True,
            capture_output=True,
            timeout=300,
        )

    def url(self, db: str | None = None) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db or self.db}"

    def postmaster(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def _huge_pages_needed(self) -> int:
        """The huge pages the instance's shared memory takes with these
        settings, as the server computes it (PostgreSQL 15's
        ``shared_memory_size_in_huge_pages``, asked of a stopped instance)."""
        out = subprocess.run(
            [
                *self.prefix,
                str(PG_BIN / "postgres"),
                "-D",
                str(self.data),
                "-C",
                "shared_memory_size_in_huge_pages",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return int(out.stdout.strip())

    def close(self) -> None:
        with suppress(subprocess.SubprocessError):
            self._ctl("-m", "fast", "-w", "stop")
        if self.huge_pages is not None:
            self.huge_pages.release()


HUGE_PAGES = Path("/proc/sys/vm/nr_hugepages")


class HugePages:
    """The kernel's huge pages reserved for one instance's shared memory
    (as a production box reserves them for its shared_buffers: with 4 KB
    pages, every random B-tree page touched costs TLB misses too), and given
    back after. Where they cannot be reserved (no root, memory too
    fragmented), the instance starts on normal pages (``huge_pages = try``)
    and ``in_use`` says so; the benchmarks report it."""

    def __init__(self, needed: int) -> None:
        self.needed, self.added, self.in_use = needed, 0, False
        self.before = int(HUGE_PAGES.read_text())
        try:
            HUGE_PAGES.write_text(str(self.before + needed))
        except OSError:
            return
        self.added = int(HUGE_PAGES.read_text()) - self.before
        self.free_before = _meminfo("HugePages_Free")

    def check_taken(self) -> None:
        """After the start: whether the server took them (pages touched plus
        pages promised to it). All or nothing: the server maps its whole
        shared memory on huge pages or none of it."""
        if self.added >= self.needed:
            self.in_use = self.free_before - _meminfo("HugePages_Free") + _meminfo("HugePages_Rsvd") > 0

    def release(self) -> None:
        if self.added:
            with suppress(OSError):
                HUGE_PAGES.write_text(str(self.before))

    def as_json(self) -> dict[str, Any]:
        return {"needed": self.needed, "reserved": self.added, "in_use": self.in_use}


@contextmanager
def private_postgres(conf: dict[str, str], db: str | None = None) -> Iterator[PrivatePostgres]:
    """A private PostgreSQL 15 with ``conf`` (and database ``db``), removed after."""
    base = Path(tempfile.mkdtemp(prefix="issuance-pg-"))
    server = None
    try:
        server = PrivatePostgres(base, conf, db)
        yield server
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(base, ignore_errors=True)


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
            # Part of the above: vacuum and analyse of the tables the run grows.
            "postgresql_autovacuum": pgrep("postgres: autovacuum worker"),
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


# -- profiles (py-spy, a dev dependency) ---------------------------------------------
def start_profiler(pid: int, seconds: int, out: Path, *flags: str) -> subprocess.Popen[bytes]:
    """py-spy sampling process ``pid`` for ``seconds`` into ``out`` (raw
    collapsed stacks); ``flags``: --subprocesses, --idle, --gil, --threads."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    argv = [spy, "record", "--pid", str(pid), "--nonblocking", "--rate", "100", *flags]
    argv += ["--duration", str(seconds), "--format", "raw", "--output", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stacks(path: Path) -> Iterator[tuple[list[str], int]]:
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        yield [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")], int(count)


def profile_summary(path: Path, top: int = 15) -> dict[str, Any]:
    """The frames the samples were in (self time), as shares of all samples."""
    own: dict[str, int] = {}
    total = 0
    for frames, count in _stacks(path):
        own[frames[-1]] = own.get(frames[-1], 0) + count
        total += count
    ranked = sorted(own.items(), key=lambda item: -item[1])[:top]
    return {"samples": total, "self": {frame: round(100 * n / max(total, 1), 1) for frame, n in ranked}}


# What a worker thread is, by its stack; what it is doing, by its innermost frames.
ROLES = (("GroupCommit._flush_forever", "flushers"), ("WorkerThread.run", "deliveries"),
         ("ConsumerThread.run", "consumers"))  # fmt: skip
STATES = (("Connection.wait", "waiting on PostgreSQL"), ("Connection._wait", "waiting on PostgreSQL"),
          ("pika/", "RabbitMQ I/O"), ("redis/", "Redis"))  # fmt: skip


def _state(frames: list[str]) -> str:
    tail = ";".join(frames[-3:])
    if "GroupCommit.submit_each" in tail or "Future.exception" in tail:
        return "waiting for a flush"
    if frames[-1].startswith("GroupCommit._flush_forever"):
        return "waiting for claims"  # in SimpleQueue.get, which py-spy does not see
    if any(key in frames[-1] for key in ("Condition.wait", "Event.wait", "_wait_for_tstate_lock", "sleep")):
        return "idle"
    # py-spy cannot tell a thread running Python from one waiting for the GIL.
    return next((name for key, name in STATES if key in tail), "Python or waiting for the GIL")


def worker_profile(path: Path, *, gil_seconds: float | None = None) -> dict[str, Any]:
    """A worker process's samples by thread role. Taken with --idle: where
    each role's wall-clock time went (shares of that role's samples). Taken
    with --gil over ``gil_seconds`` (only the thread holding the GIL is
    sampled, 100 times a second): the share of the time each role held it,
    and the frames it held it in."""
    by_role: dict[str, dict[str, int]] = {}
    own: dict[str, int] = {}
    total = 0
    for frames, count in _stacks(path):
        stack = ";".join(frames)
        role = next((name for key, name in ROLES if key in stack), "other")
        state = _state(frames)
        by_role.setdefault(role, {}).setdefault(state, 0)
        by_role[role][state] += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        total += count
    if gil_seconds is not None:
        ranked = sorted(own.items(), key=lambda item: -item[1])[:12]
        ticks = 100 * gil_seconds
        return {
            "samples": total,
            "gil_held_pct_by": {role: round(100 * sum(s.values()) / ticks, 1) for role, s in by_role.items()},
            "self": {frame: round(100 * n / max(total, 1), 1) for frame, n in ranked},
        }
    return {
        "samples": total,
        "roles": {
            role: {state: round(100 * n / sum(states.values()), 1) for state, n in sorted(states.items())}
            for role, states in by_role.items()
        },
    }
