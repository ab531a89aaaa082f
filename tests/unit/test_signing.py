"""Message signatures and log redaction, as pure code."""

from __future__ import annotations

import logging
import time
from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import Callbacks, GroupCallbacks, Pipelines
from issuance.shared.errors import TransientError
from issuance.shared.settings import Settings
from issuance.shared.wire import codec, signing
from issuance.shared.wire.signing import SigningConfigError, parse_keys, refusal, sign_envelope
from issuance.workers import runtime
from issuance.workers import signing as workers_signing
from issuance.workers.broker import middleware
from issuance.workers.redaction import RedactingFilter, redact_text
from issuance.workers.startup import PhoneKeyCheck

from tests.conftest import claim

KEYS = "k2:second-secret-0123456789,k1:first-secret-0123456789"


def _check(keys: signing.SigningKeys, env: dict) -> str | None:
    refused = refusal(keys, env)
    return None if refused is None else refused.reason


def _wire(env: dict) -> dict:
    """The envelope as a worker decodes it."""
    return codec.OrjsonEncoder().decode(codec.dumps(env))


def _signed(keys: signing.SigningKeys, **options: object) -> dict:
    env = codec.envelope(claim("spring"))
    return _wire(sign_envelope({**env, "options": dict(options)}, keys))


def test_the_first_key_signs_and_every_key_verifies():
    keys = parse_keys(KEYS)
    assert keys.active == "k2" and set(keys.secrets) == {"k1", "k2"}
    env = _signed(keys)
    assert env["options"]["signature"]["kid"] == "k2"
    assert _check(keys, env) is None
    # Rotation: a message signed with the old key still verifies while it is listed.
    old = _signed(parse_keys("k1:first-secret-0123456789"))
    assert _check(keys, old) is None
    assert _check(parse_keys("k3:third-secret-0123456789"), old) == "unknown_signing_key"


def test_a_verify_only_key_verifies_but_never_signs():
    # Step 1 of a rotation: k2 is accepted before anything is signed with it.
    step1 = parse_keys("k1:first-secret-0123456789,verify-only:k2:second-secret-0123456789")
    assert step1.active == "k1" and set(step1.secrets) == {"k1", "k2"}
    assert _signed(step1)["options"]["signature"]["kid"] == "k1"
    step2 = parse_keys("k2:second-secret-0123456789,k1:first-secret-0123456789")
    assert _check(step1, _signed(step2)) is None
    # The order of the entries does not matter for which one signs.
    first = parse_keys("verify-only:k2:second-secret-0123456789,k1:first-secret-0123456789")
    assert first.active == "k1"


def test_an_unknown_key_is_retryable_and_every_other_refusal_is_not():
    keys = parse_keys(KEYS)
    unknown = refusal(keys, _signed(parse_keys("k9:ninth-secret-0123456789")))
    assert unknown is not None and unknown.retryable
    unsigned = refusal(keys, {**_signed(keys), "options": {}})
    assert unsigned is not None and not unsigned.retryable


def test_unsigned_tampered_and_forged_messages_are_refused():
    keys = parse_keys(KEYS)
    env = _signed(keys)
    assert _check(keys, {**env, "options": {}}) == "unsigned"
    tampered = {**env, "args": [{**env["args"][0], "phone": "+8613900000000"}]}
    assert _check(keys, tampered) == "bad_signature"
    assert _check(keys, {**env, "message_id": "another"}) == "bad_signature"
    assert _check(keys, {**env, "actor_name": "credit_claim"}) == "bad_signature"
    assert _check(keys, {**env, "queue_name": "credits"}) == "bad_signature"
    assert _check(keys, {**env, "message_timestamp": env["message_timestamp"] + 1}) == "bad_signature"
    forged = {**env, "options": {"signature": {"kid": "k2", "mac": "00" * 32}}}
    assert _check(keys, forged) == "bad_signature"
    assert (
        _check(keys, {**env, "options": {"signature": {"kid": "k2", "mac": "\u00e9" * 64}}})
        == "bad_signature"
    )
    assert _check(keys, {**env, "options": {"signature": "junk"}}) == "unsigned"


@pytest.mark.parametrize(
    "option", [{"max_retries": 0}, {"time_limit": 1}, {"max_age": 1}, {"throws": "Exception"}, {"x": 1}]
)
def test_every_option_that_changes_behaviour_is_signed(option):
    keys = parse_keys(KEYS)
    env = _signed(keys)
    assert _check(keys, {**env, "options": {**env["options"], **option}}) == "bad_signature"
    # The same option set before signing is fine.
    assert _check(keys, _signed(keys, **option)) is None
    signed = _signed(keys, **option)
    changed = {**signed, "options": {**signed["options"], **{k: 2 for k in option}}}
    assert _check(keys, changed) == "bad_signature"


def test_what_retries_and_delays_write_after_signing_keeps_the_signature():
    keys = parse_keys(KEYS)
    env = _signed(keys)
    bookkeeping = {"retries": 3, "traceback": "...", "requeue_timestamp": 1, "eta": 2}
    assert _check(keys, {**env, "options": {**env["options"], **bookkeeping}}) is None
    # On its way back from the delay queue a message carries that queue's name.
    assert _check(keys, {**env, "queue_name": "claims.DQ"}) is None


@pytest.mark.parametrize("option", sorted(signing.FORBIDDEN_OPTIONS))
def test_pipelines_and_callbacks_are_refused_signed_or_not(option):
    """The bypass of issue 19: a signed claim re-sent with another claim in
    ``pipe_target`` passed the check, and a worker signed and ran the other."""
    keys = parse_keys(KEYS)
    env = _signed(keys)
    piped = {**codec.envelope(claim("spring")), "options": {"pipe_ignore": True}}
    replayed = {**env, "options": {**env["options"], option: piped}}
    assert _check(keys, replayed) == "forbidden_option"
    assert _check(keys, _signed(keys, **{option: piped})) == "forbidden_option"
    assert _check(signing.NO_KEYS, _wire(replayed)) == "forbidden_option"


def test_signing_off_accepts_everything_and_signs_nothing():
    env = codec.envelope(claim("spring"))
    assert sign_envelope(env, signing.NO_KEYS) is env
    assert _check(signing.NO_KEYS, _wire(env)) is None


@pytest.mark.parametrize(
    "bad",
    [
        "k1",
        "k1:short",
        ":secret-long-enough-0000",
        "k1:a-long-secret-00000,k1:b-long-secret-00000",
        "verify-only:k1:a-long-secret-00000",
        "verify-only:verify-only:a-long-secret-00000",
        "k1:a-long-secret-00000,verify-only:k1:b-long-secret-00000",
    ],
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
        assert _check(parse_keys(KEYS), _wire(env)) is None
    finally:
        monkeypatch.delenv(signing.ENV)
        signing.use_keys(None)
    assert "signature" not in codec.envelope(claim("spring"))["options"]


# -- the middleware, on Dramatiq's in-process broker and worker ---------------

W_KEYS = "k1:first-secret-0123456789"


class Pipeline:
    """A stub broker with the workers' middleware and a claims actor that
    records what it ran; refusals are recorded instead of stored."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, max_retries: int = 40, fail_first: bool = False):
        self.ran: list[str] = []
        self.attempts = 0
        self.refused: list[tuple[str, str | None]] = []
        monkeypatch.setattr(
            runtime, "dead_letter", lambda *args, key=None: self.refused.append((str(args[2]), key))
        )
        dramatiq.set_encoder(codec.OrjsonEncoder())
        settings = Settings(min_backoff_ms=20, max_backoff_ms=40, max_retries=max_retries)
        # Without the phone-key check at worker boot: it needs the database.
        chain = [m for m in middleware(settings) if not isinstance(m, PhoneKeyCheck)]
        self.broker = StubBroker(middleware=chain)

        def claim_requested(payload: dict) -> None:
            self.attempts += 1
            if fail_first and self.attempts == 1:
                raise TransientError("the database blinked")
            self.ran.append(payload["phone"])

        dramatiq.actor(claim_requested, broker=self.broker, actor_name="claim_requested", queue_name="claims")
        self.worker = dramatiq.Worker(self.broker, worker_timeout=10)
        self.worker.start()

    def publish_raw(self, envelope: dict, queue: str = "claims") -> None:
        """As anyone who may publish to the broker: no worker hook on the way in."""
        self.broker.queues[queue].put(codec.dumps(envelope))

    def join(self) -> None:
        self.broker.join("claims", fail_fast=False)
        self.worker.join()

    def stop(self) -> None:
        self.worker.stop()
        self.broker.close()


@pytest.fixture
def pipeline(monkeypatch):
    started: list[Pipeline] = []

    def start(**options: Any) -> Pipeline:
        started.append(Pipeline(monkeypatch, **options))
        return started[-1]

    signing.use_keys(parse_keys(W_KEYS))
    yield start
    for p in started:
        p.stop()
    signing.use_keys(None)


def test_the_workers_install_neither_pipelines_nor_callbacks():
    installed = {type(m) for m in middleware(Settings())}
    assert not installed & {Pipelines, Callbacks, GroupCallbacks}
    assert type(middleware(Settings())[0]) is workers_signing.Signing


def test_a_piped_claim_in_a_replayed_envelope_never_runs(pipeline):
    p = pipeline()
    old = codec.envelope(claim("spring", "+8613900000001"))
    p.publish_raw(old)
    p.join()
    victim = {**codec.envelope(claim("spring", "+8613900000002")), "options": {"pipe_ignore": True}}
    p.publish_raw({**old, "options": {**old["options"], "pipe_target": victim}})
    p.join()
    assert p.ran == ["+8613900000001"]
    assert p.refused == [("forbidden_option", old["message_id"])]


def test_an_unsigned_message_moved_back_from_the_delay_queue_is_not_signed_by_the_worker(pipeline):
    p = pipeline()
    unsigned = {**codec.envelope(claim("spring", "+8613900000003")), "options": {"eta": 0}}
    unsigned["queue_name"] = "claims.DQ"
    p.publish_raw(unsigned, queue="claims.DQ")
    p.join()
    assert p.ran == []
    assert p.refused == [("unsigned", unsigned["message_id"])]


def test_a_signed_message_is_retried_with_its_signature_and_then_runs(pipeline):
    p = pipeline(fail_first=True)
    p.publish_raw(codec.envelope(claim("spring", "+8613900000004")))
    p.join()
    assert (p.attempts, p.ran, p.refused) == (2, ["+8613900000004"], [])


def test_the_worker_signs_what_it_sends(pipeline):
    p = pipeline()
    actor = p.broker.get_actor("claim_requested")
    sent = actor.message_with_options(args=(claim("spring", "+8613900000005").to_payload(),))
    p.broker.enqueue(sent)
    p.join()
    assert p.ran == ["+8613900000005"] and p.refused == []


def test_a_key_rolled_out_late_heals_within_the_retry_budget(pipeline):
    p = pipeline()
    new_keys = "k2:second-secret-0123456789"
    p.publish_raw(
        sign_envelope(
            {**codec.envelope(claim("spring", "+8613900000006")), "options": {}}, parse_keys(new_keys)
        )
    )
    time.sleep(0.3)  # a few retries with the unknown key
    assert (p.ran, p.refused) == ([], [])
    signing.use_keys(parse_keys(f"{W_KEYS},verify-only:{new_keys}"))
    p.join()
    assert p.ran == ["+8613900000006"] and p.refused == []


def test_an_unknown_key_that_never_arrives_fails_after_the_retry_budget(pipeline):
    p = pipeline(max_retries=2)
    env = sign_envelope(
        {**codec.envelope(claim("spring", "+8613900000007")), "options": {}},
        parse_keys("k9:ninth-secret-0123456789"),
    )
    p.publish_raw(env)
    p.join()
    assert (p.ran, p.refused) == ([], [])
    [failed] = p.broker.dead_letters
    assert failed.message_id == env["message_id"] and failed.options["retries"] == 3


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
