"""Logging as an operator would choose it, for every process: the commands,
the workers (issuance.workers.process), the page and the exporter.

- One line per event: the project's own loggers (``issuance.*``) at
  ``ISSUANCE_LOG_LEVEL`` (INFO by default), the libraries' at WARNING, so
  pika, Dramatiq, uvicorn and Alembic speak only when something is wrong.
  DEBUG (``ISSUANCE_LOG_LEVEL=DEBUG`` or ``issuance --verbose``) opens every
  logger, the libraries' included.
- ``ISSUANCE_LOG_FORMAT=json``: one JSON object per line for log shippers,
  with ``time``, ``level``, ``logger``, ``message``, the record's extra fields
  and ``exception`` when there is one.
- Records go to whatever ``sys.stderr`` is when they are emitted: Dramatiq's
  worker processes point it at the pipe their main process reads.
"""

from __future__ import annotations

import logging
import logging.config
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from issuance.shared.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# pika logs every failed connection attempt as an ERROR; the process reports
# the outage once in its own words, so pika speaks only at DEBUG.
QUIET_BELOW_DEBUG = {"pika": "CRITICAL"}


def event_loggers() -> list[str]:
    """Library loggers whose INFO lines are events an operator wants at the
    project's level: a Dramatiq consumer restarting on another node after
    its broker connection was lost (one line per restart)."""
    from issuance.shared.wire.codec import QUEUES

    queues = [*QUEUES, *(f"{q}.DQ" for q in QUEUES)]
    return [f"dramatiq.worker.ConsumerThread({q})" for q in queues]


# The attributes every LogRecord has: anything else was passed as ``extra``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update((k, v) for k, v in record.__dict__.items() if k not in _STANDARD and k[0] != "_")
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str).decode()


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler on the current ``sys.stderr``, looked up per record."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        """The stream is always the current ``sys.stderr``."""


def levels(level: str, *, verbose: bool = False) -> tuple[str, str]:
    """(the project's level, the libraries' level) for ``ISSUANCE_LOG_LEVEL``."""
    level = "DEBUG" if verbose else level.upper()
    if level == "DEBUG":
        return "DEBUG", "DEBUG"
    return level, max(level, "WARNING", key=logging.getLevelName)


def dict_config(
    settings: Settings | None = None,
    *,
    verbose: bool = False,
    loggers: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The configuration for :func:`logging.config.dictConfig` (uvicorn's
    ``log_config`` takes it too, and applies it in each of its processes).
    ``loggers`` raises or lowers named loggers (the page's access log)."""
    settings = settings or Settings()
    own, libraries = levels(settings.log_level, verbose=verbose)
    formatter: dict[str, Any] = (
        {"()": f"{__name__}.JsonFormatter"} if settings.log_format == "json" else {"format": TEXT_FORMAT}
    )
    named: dict[str, dict[str, Any]] = {"issuance": {"level": own}}
    # Set either way: a process configured twice (defaults, then settings)
    # must not keep the first configuration's levels.
    named.update(
        (name, {"level": "NOTSET" if libraries == "DEBUG" else lvl})
        for name, lvl in QUIET_BELOW_DEBUG.items()
    )
    named.update((name, {"level": own}) for name in event_loggers())
    named.update((name, {"level": lvl}) for name, lvl in (loggers or {}).items())
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"issuance": formatter},
        "handlers": {"stderr": {"()": f"{__name__}.StderrHandler", "formatter": "issuance"}},
        "root": {"level": libraries, "handlers": ["stderr"]},
        "loggers": named,
    }


def configure(
    settings: Settings | None = None,
    *,
    verbose: bool = False,
    filters: Sequence[logging.Filter] = (),
    loggers: Mapping[str, str] | None = None,
) -> None:
    """Set up the process's logging (again): one handler on stderr, in the
    chosen format, with ``filters`` on it. The plain stream handlers that
    ``logging.basicConfig`` installs (Dramatiq's, for one) are replaced;
    handlers of other kinds (a test runner's) are kept."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler) in (logging.StreamHandler, StderrHandler):
            root.removeHandler(handler)
    kept = list(root.handlers)
    for handler in kept:
        root.removeHandler(handler)
    logging.config.dictConfig(dict_config(settings, verbose=verbose, loggers=loggers))
    for handler in root.handlers:
        for log_filter in filters:
            handler.addFilter(log_filter)
    for handler in kept:
        root.addHandler(handler)
    # Python's warnings (a library's deprecation, say) become log records in
    # the same format: one JSON object per line stays one per line.
    logging.captureWarnings(True)
