"""Metric definitions, shared by every process, and their exposition.

Prometheus conventions: base units, ``_total`` on counters, bounded labels
(queue, actor, outcome, reason, activity): never a member, phone or code.

Multi-process mode: worker processes (Dramatiq forks them) and a web server's
workers write their values to files in ``PROMETHEUS_MULTIPROC_DIR``; one
exposition endpoint aggregates them (:func:`multiprocess_registry`). The
directory is wiped when a new set of processes starts on it (the first one to
import this module finds no live process owning files there), every gauge
declares how processes combine, and a process that exits is marked dead.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_OWNER_FILE = re.compile(r"_(\d+)\.(db|pid)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prepare_multiprocess_dir(directory: str | os.PathLike[str], pid: int | None = None) -> bool:
    """Claim the multi-process directory for this process; wipe it first when
    no live process owns a file there (a new run: what the previous run left
    would otherwise be added to this one's values). Returns True if it wiped.

    Each process leaves ``process_<pid>.pid`` so that its siblings starting at
    the same time see it as live before it has written any value."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    pid = os.getpid() if pid is None else pid
    with _locked(path):
        files = [f for f in path.iterdir() if _OWNER_FILE.search(f.name)]
        owners = {int(m.group(1)) for f in files if (m := _OWNER_FILE.search(f.name))}
        wiped = not any(_alive(owner) for owner in owners - {pid})
        if wiped:
            for f in files:
                f.unlink(missing_ok=True)
        (path / f"process_{pid}.pid").touch()
    return wiped


def mark_process_dead(pid: int | None = None) -> None:
    """Drop a finished process's live gauges (``live*`` modes) and its mark."""
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        return
    from prometheus_client import multiprocess

    pid = os.getpid() if pid is None else pid
    multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
    (Path(directory) / f"process_{pid}.pid").unlink(missing_ok=True)


def reap_dead_processes(directory: str | os.PathLike[str]) -> list[int]:
    """Mark dead every process that left live gauges and is gone without
    saying so (killed): its in-progress and consumer gauges must not count."""
    path = Path(directory)
    dead = set()
    for f in path.glob("*.pid"):
        m = _OWNER_FILE.search(f.name)
        if m and not _alive(int(m.group(1))):
            dead.add(int(m.group(1)))
    for pid in dead:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]
        (path / f"process_{pid}.pid").unlink(missing_ok=True)
    return sorted(dead)


if os.environ.get(MULTIPROC_ENV):
    # Before any metric below opens its file in the directory.
    prepare_multiprocess_dir(os.environ[MULTIPROC_ENV])

from prometheus_client import (  # noqa: E402 - after the directory is ready
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)


def multiprocess_registry() -> CollectorRegistry:
    """A registry that reads every process's values from the directory (or
    this process's own registry when multi-process mode is off)."""
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        from prometheus_client import REGISTRY

        return REGISTRY
    from prometheus_client import multiprocess

    reap_dead_processes(directory)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return registry


def metrics_response() -> tuple[bytes, str]:
    """The body and content type of a ``/metrics`` answer, for any web
    framework: ``body, content_type = metrics_response()``."""
    return generate_latest(multiprocess_registry()), CONTENT_TYPE_LATEST


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Scope]]
Send = Callable[[Scope], Awaitable[None]]


def asgi_app() -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """An ASGI app answering with the metrics of every process of the server,
    to mount at ``/metrics`` (e.g. ``app.mount("/metrics", asgi_app())``)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body, content_type = metrics_response()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", content_type.encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


def exported_names() -> set[str]:
    """Every sample name the page's metrics can produce (``_total``,
    ``_bucket``, ... included), for checking rules and dashboards."""
    return names_of(WEB_REQUESTS, WEB_REQUEST_SECONDS)


def names_of(*metrics: Counter | Gauge | Histogram) -> set[str]:
    """The sample names of ``metrics``."""
    names: set[str] = set()
    for metric in metrics:
        for family in metric.describe():
            names.update(sample_names(family.name, family.type))
    return names


def sample_names(name: str, kind: str) -> set[str]:
    """The series names a metric family of ``kind`` exposes."""
    if kind == "counter":
        return {name + "_total", name + "_created"}
    if kind == "histogram":
        return {name + s for s in ("_bucket", "_sum", "_count", "_created")}
    return {name}


# The activity page (producers/web): requests by route template and status.
WEB_REQUESTS = Counter(
    "issuance_web_requests_total",
    "Requests to the activity page, by route template and status.",
    ["route", "status"],
)
WEB_REQUEST_SECONDS = Histogram(
    "issuance_web_request_seconds",
    "Time to answer a request to the activity page, by route template.",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
