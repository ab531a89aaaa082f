"""Metrics of the worker processes, as Dramatiq middleware.

Every worker process counts into ``PROMETHEUS_MULTIPROC_DIR`` (see
issuance.shared.metrics); the middleware adds the per-delivery view (in progress,
duration, errors), the consumer gauges, and, through Dramatiq's ``forks``, one
extra process started by the dramatiq main process that serves ``/metrics``
over HTTP on ``ISSUANCE_METRICS_PORT``, aggregating every worker process.

Two worker groups on one host do not collide: each has its own metrics
directory (``issuance worker``), a group whose port is taken (or 0) serves on
a free port the system picks, and every group announces where it serves as a
Prometheus file_sd target file, ``<ISSUANCE_METRICS_TARGETS_DIR>/<group>.json``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy
from issuance.shared.settings import Settings

log = logging.getLogger(__name__)


class WorkerMetrics(dramatiq.Middleware):
    """In-progress gauge, handling duration and errors per queue and actor;
    consumers per queue; the exposition server as a fork."""

    def __init__(self) -> None:
        self._started: dict[str, float] = {}

    @property
    def forks(self) -> list[Any]:
        return [serve_metrics]

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        from issuance.workers.instruments import CONSUMERS, WORKER_THREADS

        for queue in getattr(worker, "consumers", {}):
            if not queue.endswith((".DQ", ".XQ")):
                CONSUMERS.labels(queue).inc()
        WORKER_THREADS.inc(len(getattr(worker, "workers", ())))

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        from issuance.shared.metrics import mark_process_dead

        # Live gauges of this process stop counting as soon as it stops consuming.
        mark_process_dead()

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        from issuance.workers.instruments import IN_PROGRESS

        IN_PROGRESS.labels(message.queue_name, message.actor_name).inc()
        self._started[message.message_id] = time.perf_counter()

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        from issuance.workers.instruments import IN_PROGRESS, MESSAGE_DURATION, MESSAGE_ERRORS

        labels = (message.queue_name, message.actor_name)
        started = self._started.pop(message.message_id, None)
        if started is None:
            return
        IN_PROGRESS.labels(*labels).dec()
        MESSAGE_DURATION.labels(*labels).observe(time.perf_counter() - started)
        if exception is not None:
            MESSAGE_ERRORS.labels(*labels).inc()

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        self.after_process_message(broker, message)


class _MetricsHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.split("?")[0] not in ("/metrics", "/"):
            self.send_error(404)
            return
        from issuance.shared.metrics import metrics_response

        body, content_type = metrics_response()
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)


def bind(port: int, address: str = "127.0.0.1") -> ThreadingHTTPServer:
    """The metrics server on ``address``:``port``; on a free port the system
    picks when ``port`` is 0 or taken (another worker group on this host)."""
    try:
        return ThreadingHTTPServer((address, port), _MetricsHandler)
    except OSError as exc:
        if port == 0:
            raise
        server = ThreadingHTTPServer((address, 0), _MetricsHandler)
        log.warning(
            "port %d is taken (%s): serving worker metrics on port %d instead;"
            " give each worker group its own --metrics-port",
            port,
            exc.strerror,
            server.server_port,
        )
        return server


# The wildcard addresses a server may be bound to (named here, bound nowhere):
# a server on one of them is announced by its host name.
WILDCARDS = frozenset(("0.0.0.0", "::", ""))  # noqa: S104  # nosec B104


def announce(directory: Path, group: str, port: int, address: str, cell: str = "") -> Path:
    """Write this group's endpoint as a Prometheus file_sd target file: the
    address it is bound to, or the host's name when bound to every address.
    A worker of a cell (``ISSUANCE_CELL``) labels its target with the cell,
    as the exporter labels its samples: dashboards break down by ``cell``.
    Its file is named after the cell too: two cells' groups of one name may
    share a host."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (f"{cell}-{group}.json" if cell else f"{group}.json")
    host = socket.gethostname() if address in WILDCARDS else address
    labels = {"group": group, **({"cell": cell} if cell else {})}
    target = [{"targets": [f"{host}:{port}"], "labels": labels}]
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(target) + "\n")
    partial.replace(path)  # Prometheus never reads half a file
    return path


def targets_dir(settings: Settings) -> Path:
    return Path(settings.metrics_targets_dir or Path(tempfile.gettempdir()) / "issuance-metrics-targets")


def serve_metrics() -> int:
    """Serve ``/metrics`` until the dramatiq main process stops this fork."""
    from issuance.workers.process import boot_fork, group_name, set_title

    settings = boot_fork("metrics")
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Each worker process keeps its values in memory: nothing to add up.
        log.warning("PROMETHEUS_MULTIPROC_DIR is not set: worker metrics are not served")
        return 0
    try:
        server = bind(settings.metrics_port, settings.metrics_bind)
    except OSError as exc:
        log.error("cannot serve worker metrics: %s", exc)
        return 1
    group = group_name(settings)
    port = server.server_port
    target = announce(targets_dir(settings), group, port, settings.metrics_bind, settings.cell.strip())
    set_title(f"metrics :{port}", settings)
    log.info("serving worker metrics on %s:%d/metrics (announced in %s)", settings.metrics_bind, port, target)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        target.unlink(missing_ok=True)
    return 0
