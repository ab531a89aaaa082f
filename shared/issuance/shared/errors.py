"""The exception tree. Permanent errors never retry: the message goes to the
dead-letter store with the reason. Transient errors retry with a bounded
backoff. Operator errors are mistakes a person at the command line can put
right; ``issuance`` prints them on one line. Anything else is a bug and keeps
its traceback."""

from __future__ import annotations


class IssuanceError(Exception):
    """Base of every error this project raises on purpose."""


class PermanentError(IssuanceError):
    """Retrying cannot help: record the reason and move on."""


class InvalidMessage(PermanentError):
    """A message failed decoding or validation.

    ``reason`` is a short, stable, machine-readable code (``missing_field``,
    ``bad_phone``...); ``detail`` says what exactly was wrong.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ConflictingDuplicate(PermanentError):
    """The same idempotency key arrived again with a different payload."""


class TransientError(IssuanceError):
    """A dependency is unavailable; the work will be retried."""


class PublishError(TransientError):
    """The broker did not confirm a publish."""


class OperatorError(IssuanceError):
    """Something the operator can put right: a file, a value, a name, the
    configuration, or a service to start. ``issuance`` prints the message on
    one line, with no traceback, and exits with ``exit_status``; nothing was
    changed."""

    exit_status = 2


class BadInput(OperatorError):
    """A file that cannot be read or written, or a value that cannot be used."""


class UnknownName(OperatorError):
    """No activity, channel, template or code batch goes by that name."""


class ConfigurationError(OperatorError):
    """An ``ISSUANCE_*`` variable cannot be used (a malformed URL...)."""


class ServiceUnavailable(OperatorError):
    """PostgreSQL, RabbitMQ or Redis cannot be reached, or refuses the
    connection. Running the command again once the service is back may work."""

    exit_status = 3
