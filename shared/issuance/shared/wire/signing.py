"""Message signatures: HMAC-SHA256 over everything that decides what a
message does, with keys that rotate in three steps.

``ISSUANCE_SIGNING_KEYS`` lists ``kid:secret`` entries, comma-separated; an
entry written ``verify-only:kid:secret`` is accepted but never signed with.
The first entry that is not verify-only signs; every entry verifies. A key
is rotated in three steps, each rolled out to every process before the next
(deploy/SECURITY.md)::

    k1:<old>,verify-only:k2:<new>   # 1. workers learn k2; nobody signs with it yet
    k2:<new>,k1:<old>               # 2. k2 signs; k1 still verifies what is queued
    k2:<new>                        # 3. k1 retired

The MAC covers the queue, the actor, the message ID, the timestamp, the
arguments and every option except :data:`UNSIGNED_OPTIONS`: the signature
itself and the bookkeeping Dramatiq's retries and delays write into a
message after it was signed. It travels in the options as
``{"signature": {"kid": ..., "mac": ...}}``. Options that make a worker send
another message on its own (pipelines, callbacks) are refused whether signed
or not (:data:`FORBIDDEN_OPTIONS`). Pure code: no broker, no database.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import os
from collections.abc import Mapping
from typing import Any

import orjson
from issuance.shared.settings import settings_from

ENV = "ISSUANCE_SIGNING_KEYS"
VERIFY_ONLY = "verify-only"
MIN_SECRET_BYTES = 16
OPTION = "signature"
# Written by Dramatiq after a producer signed: Retries adds the retry count,
# the last traceback and the requeue time; a delayed enqueue adds its eta
# (removed again when the delay is over). None of them makes a message do
# anything else: a forged count or eta only retries or delays the forger's
# own message. A middleware that adds an option to a message in flight must
# list it here, or the message no longer verifies.
UNSIGNED_OPTIONS = frozenset((OPTION, "retries", "traceback", "requeue_timestamp", "eta"))
# Options with which Dramatiq builds and sends another message on the
# worker's behalf, which the worker would then sign: the project uses none.
FORBIDDEN_OPTIONS = frozenset(
    (
        "pipe_target",
        "pipe_ignore",
        "on_success",
        "on_failure",
        "on_retry_exhausted",
        "group_completion_uuid",
        "group_completion_callbacks",
    )
)
# A message on its way through a delay or dead-letter queue carries that queue's name.
_QUEUE_SUFFIXES = (".DQ", ".XQ")


class SigningConfigError(ValueError):
    """``ISSUANCE_SIGNING_KEYS`` cannot be used."""


class Reason(enum.StrEnum):
    """Why a delivery does not run; stored as the dead letter's reason."""

    UNSIGNED = "unsigned"
    UNKNOWN_SIGNING_KEY = "unknown_signing_key"
    BAD_SIGNATURE = "bad_signature"
    FORBIDDEN_OPTION = "forbidden_option"


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    reason: Reason
    detail: str

    @property
    def retryable(self) -> bool:
        """An unknown key may be one that this process has not been given
        yet (a rotation rolled out in the wrong order): worth a bounded retry."""
        return self.reason is Reason.UNKNOWN_SIGNING_KEY


@dataclasses.dataclass(frozen=True, slots=True)
class SigningKeys:
    secrets: Mapping[str, bytes]
    active: str | None

    @property
    def enabled(self) -> bool:
        return self.active is not None


NO_KEYS = SigningKeys({}, None)


def parse_keys(text: str) -> SigningKeys:
    """``[verify-only:]kid:secret`` entries separated by commas; the first
    entry that is not verify-only signs."""
    secrets: dict[str, bytes] = {}
    active = None
    for item in filter(None, (part.strip() for part in text.split(","))):
        verify_only = item.startswith(VERIFY_ONLY + ":")
        kid, sep, secret = item.removeprefix(VERIFY_ONLY + ":").partition(":")
        if not sep or not kid or not secret:
            raise SigningConfigError(f"{ENV}: expected kid:secret, got an entry without both")
        if kid == VERIFY_ONLY:
            raise SigningConfigError(f"{ENV}: {VERIFY_ONLY!r} marks an entry and cannot be a key id")
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise SigningConfigError(f"{ENV}: the secret of {kid!r} is shorter than {MIN_SECRET_BYTES} bytes")
        if kid in secrets:
            raise SigningConfigError(f"{ENV}: key id {kid!r} appears twice")
        secrets[kid] = secret.encode()
        if not verify_only:
            active = active or kid
    if secrets and active is None:
        raise SigningConfigError(f"{ENV}: every key is {VERIFY_ONLY}; one key must sign")
    return SigningKeys(secrets, active)


_process_keys: SigningKeys | None = None


def process_keys() -> SigningKeys:
    """The keys of this process, read once from the environment."""
    global _process_keys  # noqa: PLW0603 - one key set per process
    if _process_keys is None:
        _process_keys = parse_keys(settings_from(os.environ).signing_keys)
    return _process_keys


def use_keys(keys: SigningKeys | None) -> None:
    """Replace the process's keys (tests); None re-reads the environment."""
    global _process_keys  # noqa: PLW0603 - one key set per process
    _process_keys = keys


def _canonical_queue(queue_name: str) -> str:
    for suffix in _QUEUE_SUFFIXES:
        if queue_name.endswith(suffix):
            return queue_name.removesuffix(suffix)
    return queue_name


def canonical(envelope: Mapping[str, Any]) -> bytes:
    """The signed bytes: the envelope's fields as on the wire, as JSON with
    sorted keys, without the options listed in UNSIGNED_OPTIONS."""
    options = envelope.get("options") or {}
    fields = {
        "queue": _canonical_queue(envelope["queue_name"]),
        "actor": envelope["actor_name"],
        "id": envelope["message_id"],
        "ts": envelope["message_timestamp"],
        "args": list(envelope["args"]),
        "kwargs": envelope.get("kwargs") or {},
        "options": {name: value for name, value in options.items() if name not in UNSIGNED_OPTIONS},
    }
    # Round-trip so that datetimes and UUIDs read as they do once decoded.
    return orjson.dumps(orjson.loads(orjson.dumps(fields)), option=orjson.OPT_SORT_KEYS)


def mac(secret: bytes, data: bytes) -> str:
    return hmac.new(secret, data, hashlib.sha256).hexdigest()


def signature(keys: SigningKeys, envelope: Mapping[str, Any]) -> dict[str, str]:
    """The signature option for ``envelope`` (a Dramatiq envelope or ``Message.asdict()``)."""
    assert keys.active is not None
    return {"kid": keys.active, "mac": mac(keys.secrets[keys.active], canonical(envelope))}


def sign_envelope(envelope: dict[str, Any], keys: SigningKeys) -> dict[str, Any]:
    """The envelope with its signature in the options (unchanged when signing is off)."""
    if not keys.enabled:
        return envelope
    options = {name: value for name, value in envelope.get("options", {}).items() if name != OPTION}
    return {**envelope, "options": {**options, OPTION: signature(keys, envelope)}}


def refusal(keys: SigningKeys, envelope: Mapping[str, Any]) -> Refusal | None:
    """Why a delivery must not run, or None if it may."""
    options = envelope.get("options") or {}
    forbidden = sorted(FORBIDDEN_OPTIONS.intersection(options))
    if forbidden:
        return Refusal(Reason.FORBIDDEN_OPTION, f"the message carries the option {forbidden[0]!r}")
    if not keys.enabled:
        return None
    sig = options.get(OPTION)
    if (
        not isinstance(sig, dict)
        or not isinstance(sig.get("kid"), str)
        or not isinstance(sig.get("mac"), str)
    ):
        return Refusal(Reason.UNSIGNED, "signing is on and the message carries no signature")
    secret = keys.secrets.get(sig["kid"])
    if secret is None:
        return Refusal(
            Reason.UNKNOWN_SIGNING_KEY, f"signed with key id {sig['kid'][:40]!r}, which is not configured"
        )
    try:
        expected = mac(secret, canonical(envelope))
    except (KeyError, TypeError, AttributeError, orjson.JSONEncodeError):
        return Refusal(Reason.BAD_SIGNATURE, "the signed fields cannot be serialised")
    if not hmac.compare_digest(expected.encode(), sig["mac"].encode()):
        return Refusal(Reason.BAD_SIGNATURE, f"the HMAC does not match key {sig['kid']!r}")
    return None
