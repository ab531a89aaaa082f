"""Private PostgreSQL, Redis and RabbitMQ instances that a chaos run owns.

The machine's shared services (5432, 6379, 5672) are never touched: each
run starts its own on free ports under a temporary directory, kills and
restarts them at will, and removes them at the end.
"""

from __future__ import annotations

import contextlib
import os
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    def __init__(self, base: Path) -> None:
        self.dir = base / "rabbit"
        self.dir.mkdir()
        _chown(self.dir, "rabbitmq")
        plugins = self.dir / "plugins"
        plugins.write_text("[].\n")
        _chown(plugins, "rabbitmq")
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
        self.rabbit = PrivateRabbit(self.base)

    def close(self) -> None:
        for service in (self.rabbit, self.redis, self.postgres):
            with contextlib.suppress(Exception):
                service.close()
        shutil.rmtree(self.base, ignore_errors=True)
