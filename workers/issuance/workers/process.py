"""Each process of a worker group as an operator sees it: its log lines and
its title.

``issuance worker`` runs Dramatiq's main process, which forks the worker
processes and two fork processes (metrics, sweeper). Each one sets its title
(``ps``, ``top``) to ``issuance worker <group>: <role>``, and logs through
issuance.shared.logs with the phone filter (issuance.workers.redaction).

Dramatiq logs a delivery it cannot use (an envelope it cannot decode, an
actor it does not know) as an ERROR with a 20-line traceback, then
rejects it into ``<queue>.XQ``. :class:`DeadLetterLines` turns each into
one WARNING line with its reason; ``issuance dead-letters drain`` stores it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import dramatiq
from dramatiq.brokers.stub import StubBroker
from issuance.shared import logs
from issuance.shared.settings import Settings, load_settings
from issuance.shared.wire.codec import xq_name
from issuance.workers.redaction import RedactingFilter

log = logging.getLogger(__name__)


def group_name(settings: Settings, queues: list[str] | None = None) -> str:
    """The worker group's name: the setting, else its queues, else "all"."""
    return settings.worker_group or "+".join(queues or ()) or "all"


def set_title(role: str, settings: Settings | None = None) -> str:
    """Title this process ``issuance worker <group>: <role>``."""
    import setproctitle

    title = f"issuance worker {group_name(settings or load_settings())}: {role}"
    setproctitle.setproctitle(title)
    return title


class DeadLetterLines(logging.Filter):
    """One line with its reason for each delivery Dramatiq rejects itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.msg if isinstance(record.msg, str) else ""
        if record.name.startswith("dramatiq.") and text.startswith("Failed to decode message"):
            error = record.exc_info[1] if record.exc_info else None
            reason = str(getattr(error, "__cause__", None) or error or "undecodable")
            queue = getattr(threading.current_thread(), "queue_name", "?")
        elif record.name.startswith("dramatiq.worker.ConsumerThread(") and text.startswith(
            "Received message for undefined actor"
        ):
            reason = f"no actor {record.args[0] if record.args else '?'!r} here"  # type: ignore[index]
            queue = record.name.partition("(")[2].rstrip(")")
        else:
            return True
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg = "dead-lettered a delivery from %s to %s: %s"
        record.args = (queue, xq_name(queue), reason)
        record.exc_info = record.exc_text = None
        return True


def configure_logging(settings: Settings | None = None) -> None:
    """The project's logging in a worker-side process. Dramatiq's own
    ``-v`` (the root logger at DEBUG when it ran) still means DEBUG."""
    verbose = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    logs.configure(
        settings or load_settings(), verbose=verbose, filters=[DeadLetterLines(), RedactingFilter()]
    )


def boot_fork(role: str) -> Settings:
    """What a fork process (metrics, sweeper) does first."""
    settings = load_settings()
    configure_logging(settings)
    set_title(role, settings)
    return settings


class ProcessBoot(dramatiq.Middleware):
    """Logging and title of each worker process; a line when it is ready
    and when it has stopped."""

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        if isinstance(broker, StubBroker):
            return  # in-process (the demo, tests): the command has set up its process
        configure_logging()
        set_title("consumer")

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        queues = [q for q in getattr(worker, "consumers", {}) if not q.endswith((".DQ", ".XQ"))]
        log.info(
            "worker process is ready: consuming %s on %d threads",
            ", ".join(sorted(queues)),
            len(getattr(worker, "workers", ())),
        )

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        log.info("worker process stopped")
