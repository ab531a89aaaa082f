"""Message signatures and log redaction, as pure code."""

from __future__ import annotations

import logging

import pytest
from issuance.shared.wire import codec, signing
from issuance.shared.wire.signing import SigningConfigError, parse_keys, refusal, sign_envelope
from issuance.workers.redaction import RedactingFilter, redact_text

from tests.conftest import claim

KEYS = "k2:second-secret-0123456789,k1:first-secret-0123456789"


def _check(keys: signing.SigningKeys, env: dict) -> tuple[str, str] | None:
    return refusal(
        keys,
        env["options"],
        actor_name=env["actor_name"],
        message_id=env["message_id"],
        timestamp=env["message_timestamp"],
        args=env["args"],
    )


def _wire(env: dict) -> dict:
    """The envelope as a worker decodes it."""
    return codec.OrjsonEncoder().decode(codec.dumps(env))


def test_the_first_key_signs_and_every_key_verifies():
    keys = parse_keys(KEYS)
    assert keys.active == "k2" and set(keys.secrets) == {"k1", "k2"}
    env = _wire(sign_envelope(codec.envelope(claim("spring")), keys))
    assert env["options"]["signature"]["kid"] == "k2"
    assert _check(keys, env) is None
    # Rotation: a message signed with the old key still verifies while it is listed.
    old = _wire(sign_envelope(codec.envelope(claim("spring")), parse_keys("k1:first-secret-0123456789")))
    assert _check(keys, old) is None
    assert _check(parse_keys("k3:third-secret-0123456789"), old)[0] == "unknown_signing_key"


def test_unsigned_tampered_and_forged_messages_are_refused():
    keys = parse_keys(KEYS)
    env = _wire(sign_envelope(codec.envelope(claim("spring")), keys))
    assert _check(keys, {**env, "options": {}})[0] == "unsigned"
    tampered = {**env, "args": [{**env["args"][0], "phone": "+8613900000000"}]}
    assert _check(keys, tampered)[0] == "bad_signature"
    assert _check(keys, {**env, "message_id": "another"})[0] == "bad_signature"
    forged = {**env, "options": {"signature": {"kid": "k2", "mac": "00" * 32}}}
    assert _check(keys, forged)[0] == "bad_signature"
    assert _check(keys, {**env, "options": {"signature": "junk"}})[0] == "unsigned"
    # Retries rewrite the options; the signature still holds.
    retried = {**env, "options": {**env["options"], "retries": 3, "traceback": "..."}}
    assert _check(keys, retried) is None


def test_signing_off_accepts_everything_and_signs_nothing():
    env = codec.envelope(claim("spring"))
    assert sign_envelope(env, signing.NO_KEYS) is env
    assert _check(signing.NO_KEYS, _wire(env)) is None


@pytest.mark.parametrize(
    "bad", ["k1", "k1:short", ":secret-long-enough-0000", "k1:a-long-secret-00000,k1:b-long-secret-00000"]
)
def test_bad_key_configuration_fails_loudly(bad):
    with pytest.raises(SigningConfigError):
        parse_keys(bad)


def test_the_codec_signs_with_the_process_keys(monkeypatch):
    monkeypatch.setenv(signing.ENV, KEYS)
    signing.use_keys(None)
    try:
        env = codec.envelope(claim("spring"))
        assert env["options"]["signature"]["kid"] == "k2"
    finally:
        monkeypatch.delenv(signing.ENV)
        signing.use_keys(None)
    assert "signature" not in codec.envelope(claim("spring"))["options"]


@pytest.mark.parametrize(
    "text",
    [
        "Failed to process message claim_requested({'v': 1, 'phone': '+8613912345678'})",
        'body {"phone": "139 1234 5678", "activity": "x"}',
        "number +8613912345678 refused",
        "number 13912345678 refused",
    ],
)
def test_log_redaction_masks_numbers(text):
    out = redact_text(text)
    assert "13912345678" not in out.replace(" ", "")
    assert "9123456" not in out.replace(" ", "")


def test_log_redaction_leaves_ids_and_times_alone():
    text = "claim 9a7b1d2e-3c4f-4a5b-8c6d-7e8f9a0b1c2d at 2026-11-11T00:01:30+00:00 in 1234 ms"
    assert redact_text(text) == text


def test_the_filter_rewrites_records_with_arguments():
    record = logging.LogRecord(
        "dramatiq", logging.WARNING, __file__, 1, "message %s", ({"phone": "+8613912345678"},), None
    )
    RedactingFilter().filter(record)
    assert "+8613912345678" not in record.getMessage()
