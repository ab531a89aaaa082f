"""The signing middleware: workers sign what they enqueue and refuse
deliveries that are unsigned or badly signed while signing is on.

A refused delivery goes to the dead-letter store with its reason
(``unsigned``, ``unknown_signing_key``, ``bad_signature``) and is
acknowledged: a forged message never runs and never loops.
"""

from __future__ import annotations

import logging
from typing import Any

import dramatiq
from dramatiq.middleware import SkipMessage
from issuance.shared.db import store
from issuance.shared.metrics import DEAD_LETTERS
from issuance.shared.wire import signing

log = logging.getLogger(__name__)


class Signing(dramatiq.Middleware):
    def __init__(self, keys: signing.SigningKeys | None = None) -> None:
        self._keys = keys

    @property
    def keys(self) -> signing.SigningKeys:
        return self._keys if self._keys is not None else signing.process_keys()

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: Any) -> None:
        keys = self.keys
        if keys.enabled:
            message.options[signing.OPTION] = signing.signature(
                keys, message.actor_name, message.message_id, message.message_timestamp, message.args
            )

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        refused = signing.refusal(
            self.keys,
            message.options,
            actor_name=message.actor_name,
            message_id=message.message_id,
            timestamp=message.message_timestamp,
            args=message.args,
        )
        if refused is None:
            return
        reason, detail = refused
        _dead_letter(message, reason, detail)
        raise SkipMessage(reason)


def _dead_letter(message: Any, reason: str, detail: str) -> None:
    import orjson
    from issuance.workers.runtime import redact, resources

    payload = message.args[0] if message.args else None
    body = orjson.dumps(redact(payload), default=str).decode()
    with resources().pool.connection() as conn, conn.transaction():
        stored = store.insert_dead_letter(
            conn,
            message_key=message.message_id,
            queue=message.queue_name,
            actor=message.actor_name,
            reason=reason,
            detail=detail,
            body=body,
        )
    if stored:
        DEAD_LETTERS.labels(message.queue_name, reason).inc()
    log.warning("refused a %s message %s: %s (%s)", message.actor_name, message.message_id, reason, detail)
