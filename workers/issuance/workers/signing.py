"""The signing middleware: workers sign the messages they send and refuse
deliveries that may not run (issuance.shared.wire.signing says which).

A refused delivery goes to the dead-letter store with its reason
(``unsigned``, ``bad_signature``, ``forbidden_option``) and is acknowledged:
a forged message never runs and never loops. A message signed with a key
this worker does not know is retried within the retry budget instead, so
that a key rotation rolled out in the wrong order heals once the key
arrives; after the budget it is dead-lettered like any exhausted retry.

Dramatiq logs and swallows any exception a ``before_*`` hook raises other
than its own middleware errors, and then runs the message. Every failure of
the check is therefore raised as a middleware error: fail closed.
"""

from __future__ import annotations

import logging
from typing import Any

import dramatiq
from dramatiq.middleware import MiddlewareError, SkipMessage
from issuance.shared.errors import TransientError
from issuance.shared.wire import signing
from issuance.workers import runtime

log = logging.getLogger(__name__)


class UnknownSigningKey(MiddlewareError):
    """Signed with a key id this worker has not been given (yet)."""


class SignatureCheckFailed(MiddlewareError):
    """The signature could not be checked; the message does not run."""


class RefusalNotRecorded(MiddlewareError, TransientError):
    """A refused message could not be dead-lettered (the database is away):
    retried like any outage, and it does not run meanwhile."""


class Signing(dramatiq.Middleware):
    def __init__(self, keys: signing.SigningKeys | None = None) -> None:
        self._keys = keys

    @property
    def keys(self) -> signing.SigningKeys:
        return self._keys if self._keys is not None else signing.process_keys()

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: Any) -> None:
        # Sign what this worker sends. A message that already carries a
        # signature (a retry, a delayed message moved back to its queue)
        # keeps it: the worker never vouches for a message it did not write.
        keys = self.keys
        if keys.enabled and signing.OPTION not in message.options:
            message.options[signing.OPTION] = signing.signature(keys, message.asdict())

    def before_delay_message(self, broker: dramatiq.Broker, message: Any) -> None:
        # Dramatiq moves a delayed message back to its queue by enqueueing it
        # from this worker; one that arrived unsigned must leave unsigned, to
        # be refused when it runs.
        if self.keys.enabled:
            message.options.setdefault(signing.OPTION, None)

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        try:
            refused = signing.refusal(self.keys, message.asdict())
        except Exception as exc:
            raise SignatureCheckFailed(f"the signature of {message.message_id} could not be checked") from exc
        if refused is None:
            return
        if refused.retryable:
            log.warning("%s message %s: %s; retrying", message.actor_name, message.message_id, refused.detail)
            raise UnknownSigningKey(refused.detail)
        payload = message.args[0] if message.args else None
        try:
            runtime.dead_letter(
                message.queue_name,
                message.actor_name,
                refused.reason,
                refused.detail,
                payload,
                key=message.message_id,
            )
        except Exception as exc:
            raise RefusalNotRecorded(
                f"refused message {message.message_id} not dead-lettered: {exc}"
            ) from exc
        raise SkipMessage(refused.reason)
