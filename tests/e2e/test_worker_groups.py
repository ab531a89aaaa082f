"""Two worker groups on one host, as `issuance worker` runs them: distinct
process titles, metrics ports that do not collide, each announced in a
Prometheus file_sd target file, and quiet logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

from tests.e2e.conftest import ROOT, wait_for
from tests.e2e.test_observability import free_port


def _start(env: dict[str, str], log: Path, *queues: str, prefetch: int | None) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "issuance.shared.cli", "worker", "--processes", "1", "--threads", "2"]
    if prefetch is not None:
        argv += ["--prefetch", str(prefetch)]
    return subprocess.Popen(
        [*argv, "--queues", *queues],
        env=env,
        cwd=ROOT,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _titles(pid: int) -> list[str]:
    out = subprocess.run(
        ["ps", "-o", "args=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    )
    own = subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True, check=False)
    return sorted(line.strip() for line in (own.stdout + out.stdout).splitlines() if line.strip())


def test_two_worker_groups_on_one_host(service_env, settings, tmp_path):
    port = free_port()
    targets = tmp_path / "targets"
    env = {
        **os.environ,
        **service_env,
        "ISSUANCE_METRICS_PORT": str(port),
        "ISSUANCE_METRICS_TARGETS_DIR": str(targets),
        "TMPDIR": str(tmp_path),  # each group's metrics directory lands here
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = tmp_path / "workers.log"
    groups = {"claims+credits": ("claims", "credits"), "orders+shares": ("orders", "shares")}
    # One group with its own delivery window, one with the default (twice its 2 threads).
    prefetch = {"claims+credits": 5, "orders+shares": None}
    procs = {name: _start(env, log, *queues, prefetch=prefetch[name]) for name, queues in groups.items()}
    try:
        files = {name: targets / f"{name}.json" for name in groups}
        wait_for(lambda: all(f.exists() for f in files.values()), timeout=60, what="both groups to announce")
        endpoints = {name: json.loads(f.read_text())[0] for name, f in files.items()}
        ports = {name: int(e["targets"][0].rsplit(":", 1)[1]) for name, e in endpoints.items()}
        assert len(set(ports.values())) == 2 and port in ports.values(), ports
        assert {e["labels"]["group"] for e in endpoints.values()} == set(groups)
        for name, queues in groups.items():
            body = wait_for(
                lambda p=ports[name], q=queues[0]: _scrape_has(
                    p, f'issuance_worker_consumers{{queue="{q}"}}'
                ),
                timeout=60,
                what=f"{name} metrics",
            )
            assert 'queue="claims"' not in body or name == "claims+credits"
            expected = sorted(
                [
                    f"issuance worker {name}: main",
                    f"issuance worker {name}: consumer",
                    f"issuance worker {name}: metrics :{ports[name]}",
                    f"issuance worker {name}: sweeper",
                ]
            )
            wait_for(
                lambda pid=procs[name].pid, want=expected: _titles(pid) == want,
                timeout=30,
                what=f"the titles of {name}: {expected}, not {_titles(procs[name].pid)}",
            )
        vhost = urllib.parse.urlsplit(service_env["ISSUANCE_AMQP_URL"]).path.lstrip("/")
        windows = _prefetch_counts(vhost)
        assert windows["claims"] == windows["credits"] == {5}, windows
        assert windows["orders"] == windows["shares"] == {4}, windows
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)  # the main process stops its children
        for proc in procs.values():
            proc.wait(timeout=60)
    assert not any(targets.glob("*.json")), "a stopped group withdraws its target file"
    text = log.read_text()
    lines = text.splitlines()
    # Per group: ready, metrics served, sweeper started, its summary, stopped; one port was taken.
    assert all(" INFO issuance." in line or " WARNING issuance." in line for line in lines), text
    assert sum("is taken" in line for line in lines) == 1, text
    assert len(lines) <= 12, text


def _prefetch_counts(vhost: str) -> dict[str, set[int]]:
    """The prefetch count of each consumer, by queue, as RabbitMQ reports them."""
    out = subprocess.run(
        [
            "rabbitmqctl",
            "-q",
            "list_consumers",
            "-p",
            vhost,
            "queue_name",
            "prefetch_count",
            "--no-table-headers",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    counts: dict[str, set[int]] = {}
    for line in out.splitlines():
        queue, count = line.split()
        counts.setdefault(queue, set()).add(int(count))
    return counts


def _scrape_has(port: int, needle: str) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
    except OSError:
        return None
    return body if needle in body else None
