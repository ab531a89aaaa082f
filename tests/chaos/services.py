"""Private PostgreSQL, Redis and RabbitMQ instances that a chaos run owns.

The machine's shared services (5432, 6379, 5672) are never touched: each
run starts its own on free ports under a temporary directory, kills and
restarts them at will, and removes them at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pika
import psycopg
import redis

PG_BIN = Path("/usr/lib/postgresql/15/bin")
RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
RABBIT_HOME = "/var/lib/rabbitmq"  # where the Erlang cookie of rabbitmqctl lives
# The chaos run's node closes a channel whose oldest delivery has waited this
# long for its ack (RabbitMQ's default is 30 minutes). The channel tick
# evaluates the timeout; by default it runs once a minute, too coarse for a run.
CONSUMER_TIMEOUT_S = 20
CHANNEL_TICK_MS = 2000


def free_port() -> int:
    """A port a service started later can listen on: free now, and below the
    kernel's ephemeral range, which outgoing connections draw their local
    ports from. (A port picked inside it was taken by a client connection in
    the seconds before RabbitMQ bound it: could_not_start_listener.)"""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(1000):
        port = random.randrange(max(1024, low - 16_000), low)
        if _bindable(socket.AF_INET, "127.0.0.1", port) and _bindable(socket.AF_INET6, "::", port):
            return port
    raise RuntimeError("no free port below the ephemeral range")


def _bindable(family: socket.AddressFamily, host: str, port: int) -> bool:
    """Whether ``port`` is free on ``host`` (RabbitMQ listens on "::" too);
    a machine without IPv6 has nothing there to collide with."""
    try:
        s = socket.socket(family)
    except OSError:
        return family == socket.AF_INET6
    with s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _wait(check: object, timeout: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if check():  # type: ignore[operator]
                return time.monotonic() - start
        except Exception:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not come up within {timeout}s")


def _chown(path: Path, user: str) -> None:
    shutil.chown(path, user, user)


class PrivatePostgres:
    def __init__(self, base: Path) -> None:
        self.dir = base / "pg"
        self.dir.mkdir()
        _chown(self.dir, "postgres")
        self.port = free_port()
        self.data = self.dir / "data"
        subprocess.run(
            ["runuser", "-u", "postgres", "--", str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust",
             "-U", "postgres", "--no-sync"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        self.start()
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE chaos")

    def url(self, db: str = "chaos", port: int | None = None) -> str:
        return f"postgresql://postgres@127.0.0.1:{port or self.port}/{db}"

    def _ctl(self, *args: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip

    def start(self) -> float:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=200"
        self._ctl("-o", opts, "-l", str(self.dir / "log"), "-w", "start")
        return _wait(lambda: psycopg.connect(self.url("postgres")).close() is None, 60, "PostgreSQL")

    def crash(self) -> None:
        """Stop immediately: no checkpoint, crash recovery on the next start."""
        self._ctl("-m", "immediate", "stop")

    def refuse_connections(self, db: str = "chaos") -> int:
        """The server stays up but refuses every new connection to ``db``
        ("database is not currently accepting connections") and ends the open
        ones. Returns how many sessions it ended."""
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false')
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (db,),
            ).fetchone()
        return int(row[0]) if row else 0

    def allow_connections(self, db: str = "chaos") -> None:
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')

    def close(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self._ctl("-m", "immediate", "stop")


class PrivateRedis:
    def __init__(self, base: Path) -> None:
        self.port = free_port()
        self.log = base / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def url(self, port: int | None = None) -> str:
        return f"redis://127.0.0.1:{port or self.port}/0"

    def start(self) -> float:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no"]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        return _wait(lambda: redis.Redis.from_url(self.url()).ping(), 30, "Redis")

    def crash(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.crash()


class PrivateRabbit:
    def __init__(self, base: Path, *, consumer_timeout_s: int | None = None) -> None:
        self.dir = base / "rabbit"
        self.dir.mkdir()
        _chown(self.dir, "rabbitmq")
        plugins = self.dir / "plugins"
        plugins.write_text("[].\n")
        _chown(plugins, "rabbitmq")
        advanced = self.dir / "advanced.config"
        rabbit_env = (
            f"{{consumer_timeout, {consumer_timeout_s * 1000}}}, {{channel_tick_interval, {CHANNEL_TICK_MS}}}"
            if consumer_timeout_s
            else ""
        )
        advanced.write_text(f"[{{rabbit, [{rabbit_env}]}}].\n")
        _chown(advanced, "rabbitmq")
        self.node = f"chaos{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.pid_file = self.dir / "beam.pid"
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": RABBIT_HOME,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            # Not the machine's config file, which pins the shared node's port.
            "RABBITMQ_CONFIG_FILE": str(self.dir / "none"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(advanced),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }
        self.start()

    def url(self, port: int | None = None, *, heartbeat: int | None = None) -> str:
        url = f"amqp://guest:guest@127.0.0.1:{port or self.port}/%2F"
        return url + (f"?heartbeat={heartbeat}" if heartbeat else "")

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["runuser", "-u", "rabbitmq", "--", "env", *(f"{k}={v}" for k, v in self.env.items()),
             str(RABBIT_BIN / "rabbitmqctl"), "-n", self.node, *args],
            check=check, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    def start(self) -> float:
        self.pid_file.unlink(missing_ok=True)
        started = time.monotonic()
        subprocess.run(
            ["runuser", "-u", "rabbitmq", "--", "env", *(f"{k}={v}" for k, v in self.env.items()),
             str(RABBIT_BIN / "rabbitmq-server"), "-detached"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip

        def up() -> bool:
            pika.BlockingConnection(pika.URLParameters(self.url())).close()
            return True

        _wait(up, 120, "RabbitMQ")
        return time.monotonic() - started

    def pid(self) -> int:
        return int(self.pid_file.read_text().strip())

    def set_policy(self, name: str, pattern: str, definition: dict[str, object]) -> None:
        self.ctl(
            "set_policy", "--apply-to", "queues", "--priority", "100", name, pattern, json.dumps(definition)
        )

    def clear_policy(self, name: str) -> None:
        self.ctl("clear_policy", name, check=False)

    def _rows(self, *args: str) -> list[list[str]]:
        out = self.ctl(*args, "--quiet", "--no-table-headers", check=False).stdout
        return [line.split("\t") for line in out.splitlines() if line.strip()]

    def publishing_connections(self, heartbeat: int) -> list[str]:
        """The connections (by Erlang pid) that negotiated ``heartbeat`` and
        have no consumer on any channel: the connections the workers publish
        on, since Dramatiq consumes on connections of their own."""
        connections = {pid for pid, timeout in self._rows("list_connections", "pid", "timeout")
                       if timeout.strip() == str(heartbeat)}  # fmt: skip
        return sorted(connections - self.consuming_connections())

    def consuming_connections(self) -> set[str]:
        """The connections (by Erlang pid) with a consumer on some channel."""
        rows = self._rows("list_channels", "connection", "consumer_count")
        return {conn for conn, n in rows if n.strip() != "0"}

    def close_connection(self, pid: str, reason: str) -> bool:
        return self.ctl("close_connection", pid, reason, check=False).returncode == 0

    def timed_out_channels(self) -> set[str]:
        """The channels (by Erlang pid) the consumer timeout has closed so
        far, from the node's log. A channel whose client does not answer the
        close (a frozen one) is reported again at every tick: one pid each."""
        found: set[str] = set()
        for path in (self.dir / "log").glob("*.log"):
            for line in path.read_text(errors="replace").splitlines():
                if "has timed out waiting for delivery acknowledgement" in line:
                    found.update(re.findall(r"<\d+\.\d+\.\d+>", line)[:1])
        return found

    def crash(self) -> None:
        """kill -9 the node's Erlang VM (never the shared node, never epmd)."""
        pid = self.pid()
        os.kill(pid, signal.SIGKILL)
        _wait(lambda: not Path(f"/proc/{pid}").exists() or "zombie" in _state(pid), 30, "beam exit")

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.crash()


def _state(pid: int) -> str:
    try:
        return "zombie" if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z" else "alive"
    except OSError:
        return "gone"


class PrivateServices:
    """The three services and a temporary directory, removed on close."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="issuance-chaos-"))
        os.chmod(self.base, 0o755)
        self.postgres = PrivatePostgres(self.base)
        self.redis = PrivateRedis(self.base)
        self.rabbit = PrivateRabbit(self.base, consumer_timeout_s=CONSUMER_TIMEOUT_S)

    def close(self) -> None:
        for service in (self.rabbit, self.redis, self.postgres):
            with contextlib.suppress(Exception):
                service.close()
        shutil.rmtree(self.base, ignore_errors=True)
