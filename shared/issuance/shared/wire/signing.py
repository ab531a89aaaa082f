"""Message signatures: HMAC-SHA256 with key rotation, keys from the environment.

``ISSUANCE_SIGNING_KEYS="k2:<secret>,k1:<old secret>"`` turns signing on: the
first key signs, every listed key verifies. Rotation is: put the new key
first (producers sign with it, workers still accept the old one), wait until
no message signed with the old key can still be in a queue, drop the old key.

The signature covers the actor, the message ID, the timestamp and the
arguments (never the options, which Dramatiq rewrites on retries) and travels
in the envelope's options as ``{"signature": {"kid": ..., "mac": ...}}``.
Pure code: no broker, no database.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
from collections.abc import Mapping
from typing import Any

import orjson
from issuance.shared.settings import settings_from

ENV = "ISSUANCE_SIGNING_KEYS"
MIN_SECRET_BYTES = 16
OPTION = "signature"


class SigningConfigError(ValueError):
    """``ISSUANCE_SIGNING_KEYS`` cannot be used."""


@dataclasses.dataclass(frozen=True, slots=True)
class SigningKeys:
    secrets: Mapping[str, bytes]
    active: str | None

    @property
    def enabled(self) -> bool:
        return self.active is not None


NO_KEYS = SigningKeys({}, None)


def parse_keys(text: str) -> SigningKeys:
    """``kid:secret`` pairs separated by commas; the first one signs."""
    secrets: dict[str, bytes] = {}
    active = None
    for item in filter(None, (part.strip() for part in text.split(","))):
        kid, sep, secret = item.partition(":")
        if not sep or not kid or not secret:
            raise SigningConfigError(f"{ENV}: expected kid:secret, got an entry without both")
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise SigningConfigError(f"{ENV}: the secret of {kid!r} is shorter than {MIN_SECRET_BYTES} bytes")
        if kid in secrets:
            raise SigningConfigError(f"{ENV}: key id {kid!r} appears twice")
        secrets[kid] = secret.encode()
        active = active or kid
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


def canonical(actor_name: str, message_id: str, timestamp: Any, args: Any) -> bytes:
    """The signed bytes: the JSON form of the fields, keys sorted."""
    # Round-trip the arguments so that datetimes and UUIDs read as on the wire.
    wire_args = orjson.loads(orjson.dumps(list(args)))
    fields = {"actor": actor_name, "id": message_id, "ts": timestamp, "args": wire_args}
    return orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)


def mac(secret: bytes, data: bytes) -> str:
    return hmac.new(secret, data, hashlib.sha256).hexdigest()


def signature(
    keys: SigningKeys, actor_name: str, message_id: str, timestamp: Any, args: Any
) -> dict[str, str]:
    assert keys.active is not None
    data = canonical(actor_name, message_id, timestamp, args)
    return {"kid": keys.active, "mac": mac(keys.secrets[keys.active], data)}


def sign_envelope(envelope: dict[str, Any], keys: SigningKeys) -> dict[str, Any]:
    """The envelope with its signature in the options (unchanged when signing is off)."""
    if not keys.enabled:
        return envelope
    sig = signature(
        keys, envelope["actor_name"], envelope["message_id"], envelope["message_timestamp"], envelope["args"]
    )
    return {**envelope, "options": {**envelope.get("options", {}), OPTION: sig}}


def refusal(
    keys: SigningKeys,
    options: Mapping[str, Any],
    *,
    actor_name: str,
    message_id: str,
    timestamp: Any,
    args: Any,
) -> tuple[str, str] | None:
    """Why a delivery must be refused, as (reason, detail), or None if it may run."""
    if not keys.enabled:
        return None
    sig = options.get(OPTION)
    if (
        not isinstance(sig, dict)
        or not isinstance(sig.get("kid"), str)
        or not isinstance(sig.get("mac"), str)
    ):
        return "unsigned", "signing is on and the message carries no signature"
    secret = keys.secrets.get(sig["kid"])
    if secret is None:
        return "unknown_signing_key", f"signed with key id {sig['kid'][:40]!r}, which is not configured"
    try:
        expected = mac(secret, canonical(actor_name, message_id, timestamp, args))
    except (TypeError, orjson.JSONEncodeError):
        return "bad_signature", "the signed fields cannot be serialised"
    if not hmac.compare_digest(expected, sig["mac"]):
        return "bad_signature", f"the HMAC does not match key {sig['kid']!r}"
    return None
