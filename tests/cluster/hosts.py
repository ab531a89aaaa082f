"""Test hosts: network namespaces joined to this machine by a veth pair.

A host sees the machine at ``10.213.<n>.1`` and is ``10.213.<n>.2`` itself.
The private RabbitMQ nodes listen on every address, so the host reaches
them directly; PostgreSQL and Redis listen on loopback only, so a socat
forwarder per service listens on the host's side of the pair. Setting the
machine's end of the pair down cuts the host off, as a pulled cable would.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

from tests.chaos.services import free_port


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class NetHost:
    """One network namespace with its link, forwarders and processes."""

    def __init__(self, index: int) -> None:
        tag = secrets.token_hex(3)
        self.name = f"issuance-h{index}-{tag}"
        self.link = f"ivh{index}{tag}"  # the machine's end (at most 15 characters)
        self.peer = f"ivp{index}{tag}"
        self.gateway = f"10.213.{index}.1"
        self.address = f"10.213.{index}.2"
        self.forwarders: list[subprocess.Popen[bytes]] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", self.link, "type", "veth", "peer", "name", self.peer)
            _ip("link", "set", self.peer, "netns", self.name)
            _ip("addr", "add", f"{self.gateway}/30", "dev", self.link)
            _ip("link", "set", self.link, "up")
            _ip("netns", "exec", self.name, "ip", "addr", "add", f"{self.address}/30", "dev", self.peer)
            _ip("netns", "exec", self.name, "ip", "link", "set", self.peer, "up")
            _ip("netns", "exec", self.name, "ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def forward(self, target_port: int) -> int:
        """A port on the gateway address that leads to 127.0.0.1:``target_port``."""
        port = free_port()
        self.forwarders.append(
            subprocess.Popen(
                [
                    "socat",
                    f"TCP-LISTEN:{port},bind={self.gateway},fork,reuseaddr",
                    f"TCP:127.0.0.1:{target_port}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                # Its children serve the connections: stopped with it, as a group.
                start_new_session=True,
            )
        )
        return port

    def run(self, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.name, *argv],
            env=env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append(proc)
        return proc

    def workers(self, env: dict[str, str], log: Path, *, processes: int = 1, threads: int = 4) -> None:
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
        self.run(argv, env, log)

    def cut(self) -> None:
        """Take the link down: nothing passes either way, no RST, no FIN."""
        _ip("link", "set", self.link, "down")

    def restore(self) -> None:
        """Bring the link up again, as a cable plugged back in: the addresses
        stay, connections still alive carry on, broken ones are opened again."""
        _ip("link", "set", self.link, "up")

    def close(self) -> None:
        for proc in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        for proc in self.forwarders:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", self.link)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("netns", "del", self.name)
