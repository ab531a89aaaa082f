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

# Seconds, up to and around the 24-hour promise: the interesting part of the
# distribution under a flood is hours 1 to 24, and past it.
PROMISE_BUCKETS = (
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    900,
    1800,
    3600,
    2 * 3600,
    4 * 3600,
    6 * 3600,
    12 * 3600,
    18 * 3600,
    20 * 3600,
    22 * 3600,
    23 * 3600,
    86_400,
    26 * 3600,
    48 * 3600,
)

MESSAGES = Counter(
    "issuance_messages_total",
    "Messages handled, by queue, actor and outcome (ok, duplicate, dead_letter, retry).",
    ["queue", "actor", "outcome"],
)
CLAIMS = Counter(
    "issuance_claims_total",
    "Claims decided, by outcome (bound, refused) and refusal reason.",
    ["outcome", "reason"],
)
CODES_BOUND = Counter("issuance_codes_bound_total", "Codes bound to members.")
CREDITS = Counter(
    "issuance_credits_total", "Claims credited: packages written to members' wallets (once per claim)."
)
DEAD_LETTERS = Counter(
    "issuance_dead_letters_total", "Messages dead-lettered, by queue and reason.", ["queue", "reason"]
)
DUPLICATES = Counter(
    "issuance_duplicates_suppressed_total",
    "Deliveries that changed nothing because their effect was already recorded.",
    ["queue"],
)
CLAIM_TO_CREDIT = Histogram(
    "issuance_claim_to_credit_seconds",
    "From the claim's request to its wallet credit.",
    buckets=PROMISE_BUCKETS,
)
PROMISE_BREACHES = Counter(
    "issuance_promise_breaches_total",
    "Claims credited after their deadline (the 24-hour promise was broken).",
)
QUEUE_WAIT = Histogram(
    "issuance_queue_wait_seconds",
    "From a message's enqueue to the start of its handling.",
    ["queue"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60, 300, 900, 3600, 6 * 3600, 86_400),
)
MESSAGE_DURATION = Histogram(
    "issuance_message_duration_seconds",
    "Time spent handling one delivery, by queue and actor (failed attempts included).",
    ["queue", "actor"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
MESSAGE_ERRORS = Counter(
    "issuance_message_errors_total",
    "Deliveries whose handling raised (each is retried or dead-lettered), by queue and actor.",
    ["queue", "actor"],
)
IN_PROGRESS = Gauge(
    "issuance_messages_in_progress",
    "Messages being handled right now, by queue and actor.",
    ["queue", "actor"],
    multiprocess_mode="livesum",
)
CONSUMERS = Gauge(
    "issuance_worker_consumers",
    "Worker processes consuming each queue (live processes only).",
    ["queue"],
    multiprocess_mode="livesum",
)
WORKER_THREADS = Gauge(
    "issuance_worker_threads",
    "Worker threads of the live worker processes.",
    multiprocess_mode="livesum",
)
SWEEPER_REQUEUED = Counter(
    "issuance_sweeper_requeued_total",
    "Credit messages re-sent by the sweeper for claims bound but not credited after the grace period.",
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
    """Every sample name this module's metrics can produce (``_total``,
    ``_bucket``, ... included), for checking rules and dashboards."""
    names: set[str] = set()
    for metric in (
        MESSAGES,
        CLAIMS,
        CODES_BOUND,
        CREDITS,
        DEAD_LETTERS,
        DUPLICATES,
        CLAIM_TO_CREDIT,
        PROMISE_BREACHES,
        QUEUE_WAIT,
        MESSAGE_DURATION,
        MESSAGE_ERRORS,
        IN_PROGRESS,
        CONSUMERS,
        WORKER_THREADS,
        SWEEPER_REQUEUED,
    ):
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
