"""The logging set-up every process shares (issuance.shared.logs) and the
worker-side filters (issuance.workers.process)."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
from collections.abc import Iterator

import pytest
from dramatiq.errors import ActorNotFound, DecodeError
from issuance.shared import logs
from issuance.shared.settings import SettingsError, settings_from
from issuance.workers.process import DeadLetterLines
from issuance.workers.redaction import RedactingFilter


class Stderr:
    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def getvalue(self) -> str:
        return self.capsys.readouterr().err


@pytest.fixture
def stderr(capsys: pytest.CaptureFixture[str]) -> Iterator[Stderr]:
    """What the process's logging writes, with logging restored afterwards."""
    stream = Stderr(capsys)
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), {n: logging.getLogger(n).level for n in ("issuance", "pika")})
    yield stream
    logging.captureWarnings(False)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(saved[0])
    for handler in saved[1]:
        root.addHandler(handler)
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


def test_the_project_speaks_at_info_and_the_libraries_only_at_warning(stderr: Stderr) -> None:
    logs.configure(settings_from({}))
    logging.getLogger("issuance.workers.sweeper").info("sweeper: 1 passes")
    logging.getLogger("pika.connection").info("Created channel=1")
    logging.getLogger("dramatiq.worker.Worker").info("Shutting down...")
    logging.getLogger("alembic.runtime.plugins").info("setup plugin")
    logging.getLogger("pika.adapters").error("Connection refused")  # the command reports it once
    # A library no test configures (uvicorn's own loggers may have been set
    # up by an earlier test's server).
    logging.getLogger("some.library").warning("a warning from a library")
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith("INFO issuance.workers.sweeper sweeper: 1 passes")
    assert lines[1].endswith("WARNING some.library a warning from a library")


def test_debug_opens_every_logger(stderr: Stderr) -> None:
    logs.configure(settings_from({}))  # as every command does first, before reading its settings
    logs.configure(settings_from({"ISSUANCE_LOG_LEVEL": "debug"}))
    logging.getLogger("pika.connection").debug("frame")
    logging.getLogger("issuance.x").debug("detail")
    assert len(stderr.getvalue().splitlines()) == 2
    assert logs.levels("INFO", verbose=True) == ("DEBUG", "DEBUG")
    assert logs.levels("ERROR") == ("ERROR", "ERROR")


def test_json_logs_are_one_object_per_line_with_extra_fields(stderr: Stderr) -> None:
    logs.configure(settings_from({"ISSUANCE_LOG_FORMAT": "json"}), filters=[RedactingFilter()])
    log = logging.getLogger("issuance.workers.runtime")
    log.warning("dead-lettered a %s message for +8613912345678", "claim", extra={"queue": "claims"})
    try:
        raise ValueError("broken\nover two lines")
    except ValueError:
        log.exception("failed")
    first, second = (json.loads(line) for line in stderr.getvalue().splitlines())
    assert set(first) == {"time", "level", "logger", "message", "queue"}
    assert first["level"] == "WARNING" and first["logger"] == "issuance.workers.runtime"
    assert first["queue"] == "claims" and first["time"].endswith("+00:00")
    assert "+8613912345678" not in first["message"] and "claim message" in first["message"]
    assert "ValueError: broken" in second["exception"]


def test_a_log_setting_that_cannot_be_used_is_refused() -> None:
    with pytest.raises(SettingsError, match="ISSUANCE_LOG_FORMAT"):
        settings_from({"ISSUANCE_LOG_FORMAT": "xml"})
    with pytest.raises(SettingsError, match="ISSUANCE_LOG_LEVEL"):
        settings_from({"ISSUANCE_LOG_LEVEL": "loud"})


def test_the_handler_writes_to_stderr_as_it_is_when_a_record_comes(stderr: Stderr) -> None:
    # Dramatiq points a worker process's sys.stderr at a pipe after the fork.
    logs.configure(settings_from({}))
    later, before = io.StringIO(), sys.stderr
    sys.stderr = later
    try:
        logging.getLogger("issuance.x").info("after the fork")
    finally:
        sys.stderr = before
    assert "after the fork" in later.getvalue() and stderr.getvalue() == ""


class _Consumer(threading.Thread):
    queue_name = "claims"


def _record(name: str, msg: str, args: tuple[object, ...], error: BaseException) -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, (type(error), error, None))


def test_a_delivery_dramatiq_rejects_is_one_warning_line_with_its_reason() -> None:
    cause = DecodeError("envelope is not JSON", b"x", None)  # type: ignore[no-untyped-call]
    outer = DecodeError("Failed to decode message.", b"x", cause)  # type: ignore[no-untyped-call]
    outer.__cause__ = cause
    seen: list[str] = []

    def consume() -> None:
        record = _record(
            "dramatiq.brokers.rabbitmq.GuardedConsumer",
            "Failed to decode message using encoder %r.",
            (object(),),
            outer,
        )
        assert DeadLetterLines().filter(record)
        seen.append(logging.Formatter("%(levelname)s %(message)s").format(record))

    consumer = _Consumer(target=consume)
    consumer.start()
    consumer.join()
    assert seen == ["WARNING dead-lettered a delivery from claims to claims.XQ: envelope is not JSON"]

    record = _record(
        "dramatiq.worker.ConsumerThread(credits)",
        "Received message for undefined actor %r. Moving it to the DLQ.",
        ("nobody",),
        ActorNotFound("nobody"),  # type: ignore[no-untyped-call]
    )
    DeadLetterLines().filter(record)
    text = logging.Formatter("%(levelname)s %(message)s").format(record)
    assert text == "WARNING dead-lettered a delivery from credits to credits.XQ: no actor 'nobody' here"

    other = _record("dramatiq.worker.WorkerThread", "Failed to process message %s.", ("m",), ValueError())
    DeadLetterLines().filter(other)
    assert other.levelno == logging.ERROR and other.exc_info is not None
