"""The exception tree. Permanent errors never retry: the message goes to the
dead-letter store with the reason. Transient errors retry with a bounded
backoff."""

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
