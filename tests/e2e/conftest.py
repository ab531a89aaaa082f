"""End-to-end fixtures: the workers as real subprocesses on real RabbitMQ."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import psycopg
import pytest
from issuance.shared.settings import Settings

ROOT = Path(__file__).parents[2]


class Workers:
    """A `dramatiq issuance.workers.actors` process tree."""

    def __init__(self, env: dict[str, str], processes: int, threads: int, queues: list[str] | None) -> None:
        argv = [
            sys.executable,
            "-m",
            "dramatiq",
            "issuance.workers.actors",
            "-p",
            str(processes),
            "-t",
            str(threads),
        ]
        if queues:
            argv += ["--queues", *queues]
        self.log = Path(env["ISSUANCE_TEST_LOG"])
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=ROOT,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True, check=False)
        return [int(pid) for pid in out.stdout.split()]

    def kill(self) -> None:
        """SIGKILL the whole tree: nothing is acknowledged or cleaned up."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def consumers(settings: Settings, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        channel = connection.channel()
        from issuance.shared.wire.codec import queue_arguments

        declared = channel.queue_declare(queue, durable=True, arguments=queue_arguments(queue))
        return int(declared.method.consumer_count)
    finally:
        connection.close()


def wait_for(check: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def start_workers(
    service_env: dict[str, str], settings: Settings, tmp_path: Path
) -> Iterator[Callable[..., Workers]]:
    started: list[Workers] = []

    def start(processes: int = 1, threads: int = 4, queues: list[str] | None = None, **extra: str) -> Workers:
        env = {
            **os.environ,
            **service_env,
            "ISSUANCE_TEST_LOG": str(tmp_path / "workers.log"),
            **extra,
        }
        env.pop("PYTEST_CURRENT_TEST", None)
        workers = Workers(env, processes, threads, queues)
        started.append(workers)
        expected = processes
        wait_for(
            lambda: (
                workers.proc.poll() is not None or consumers(settings, (queues or ["claims"])[0]) >= expected
            ),
            timeout=60,
            what="workers to consume",
        )
        assert workers.proc.poll() is None, (tmp_path / "workers.log").read_text()[-3000:]
        return workers

    yield start
    for workers in started:
        workers.stop()


def claim_states(settings: Settings) -> dict[str, int]:
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute("SELECT status, count(*) FROM claims GROUP BY status").fetchall()
    return {status: int(n) for status, n in rows}
