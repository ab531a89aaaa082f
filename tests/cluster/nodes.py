"""A private three-node RabbitMQ cluster on this machine, beside the shared node.

Each node is a :class:`tests.chaos.services.PrivateRabbit` (its own node
name, AMQP and distribution ports, data and log directories, an empty
plugins file, run as the rabbitmq user so that all share its Erlang cookie);
the second and third join the first. Nothing of the shared node (5672) is
touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from tests.chaos.services import PrivateRabbit


class RabbitCluster:
    """Three clustered nodes under a temporary directory, removed on close."""

    def __init__(self, size: int = 3) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="issuance-cluster-"))
        os.chmod(self.base, 0o755)
        self.nodes: list[PrivateRabbit] = []
        started = time.monotonic()
        try:
            for letter in "abcdefg"[:size]:
                self.nodes.append(self._node(letter))
            first = self.nodes[0]
            for node in self.nodes[1:]:
                node.ctl("stop_app")
                node.ctl("join_cluster", first.node)
                node.ctl("start_app")
            self.wait_running(len(self.nodes))
        except BaseException:
            self.close()
            raise
        self.start_seconds = time.monotonic() - started

    def _node(self, letter: str, attempts: int = 2) -> PrivateRabbit:
        """A started node; a start that fails (a port taken meanwhile, a
        machine too busy) is tried again on new ports."""
        for attempt in range(attempts):
            home = self.base / f"{letter}{attempt}"
            home.mkdir()
            os.chmod(home, 0o755)
            try:
                return PrivateRabbit(home)
            except RuntimeError:
                logs = "".join(p.read_text()[-2000:] for p in home.rglob("*.log"))
                if attempt == attempts - 1:
                    raise RuntimeError(f"RabbitMQ node {letter} did not start:\n{logs}") from None
                # A node that came up too late must not linger: stop it by its pid.
                pid_file = home / "rabbit" / "beam.pid"
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        raise AssertionError("unreachable")

    def urls(self) -> str:
        """``ISSUANCE_AMQP_URL`` for the cluster: every node, ``;``-separated."""
        return ";".join(node.url() for node in self.nodes)

    def running(self, via: PrivateRabbit | None = None) -> set[str]:
        """Names of the running cluster members, as a live node sees them."""
        for node in [via] if via else self.nodes:
            result = node.ctl("eval", "rabbit_nodes:all_running().", check=False)
            if result.returncode == 0:
                return {name.strip(" '[]\n") for name in result.stdout.split(",") if "@" in name}
        return set()

    def wait_running(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.running()) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"fewer than {count} RabbitMQ nodes running after {timeout}s")
            time.sleep(0.5)

    def leader(self, queue: str, vhost: str = "/") -> PrivateRabbit:
        """The node that leads quorum queue ``queue`` (of ``vhost``)."""
        for node in self.nodes:
            result = node.ctl(
                "list_queues", "-p", vhost, "-q", "--no-table-headers", "name", "leader", check=False
            )
            if result.returncode != 0:
                continue
            for line in result.stdout.splitlines():
                name, _, leader = line.partition("\t")
                if name == queue:
                    return next(n for n in self.nodes if n.node == leader.strip())
        raise RuntimeError(f"no leader found for {queue}")

    def close(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.close()
        shutil.rmtree(self.base, ignore_errors=True)
