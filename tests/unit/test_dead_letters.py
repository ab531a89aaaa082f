"""Classifying a dead-lettered delivery: any body, never an exception."""

from __future__ import annotations

import hashlib
import uuid

import orjson
import pytest
from issuance.shared.db.dead_letters import EXCERPT_BYTES, Original, Reason, inspect
from issuance.shared.wire.codec import envelope
from pika import BasicProperties

from tests.conftest import claim

PHONE = "+8613912345678"


def _claim_envelope(**changes: object) -> dict[str, object]:
    body = envelope(claim("spring", PHONE))
    body.update(changes)
    return body


BAD_SHAPES = {
    "empty body": (b"", Reason.UNDECODABLE_ENVELOPE),
    "not JSON": (b"\x00\xff garbage", Reason.UNDECODABLE_ENVELOPE),
    "a JSON array": (b"[1, 2]", Reason.BAD_ENVELOPE),
    "a JSON string": (b'"claims"', Reason.BAD_ENVELOPE),
    "JSON null": (b"null", Reason.BAD_ENVELOPE),
    "args empty": (orjson.dumps(_claim_envelope(args=[])), Reason.BAD_ENVELOPE),
    "args an object": (orjson.dumps(_claim_envelope(args={"0": 1})), Reason.BAD_ENVELOPE),
    "args missing": (
        orjson.dumps({"actor_name": "claim_requested", "queue_name": "claims"}),
        Reason.BAD_ENVELOPE,
    ),
    "actor missing": (
        orjson.dumps({"args": [1], "queue_name": "claims", "options": {}}),
        Reason.BAD_ENVELOPE,
    ),
    "actor a number": (orjson.dumps(_claim_envelope(actor_name=7)), Reason.BAD_ENVELOPE),
    "options a list": (orjson.dumps(_claim_envelope(options=[])), Reason.BAD_ENVELOPE),
    "unknown actor": (orjson.dumps(_claim_envelope(actor_name="launch_rockets")), Reason.UNKNOWN_ACTOR),
    "wrong queue": (orjson.dumps(_claim_envelope(queue_name="credits")), Reason.WRONG_QUEUE),
    "huge": (b'{"args": ["' + PHONE.encode() * 150_000 + b'"]}', Reason.TOO_LARGE),
}


@pytest.mark.parametrize("shape", list(BAD_SHAPES))
def test_every_bad_shape_gets_its_own_reason_with_hash_and_size(shape):
    body, reason = BAD_SHAPES[shape]
    dead = inspect("claims", BasicProperties(headers={"x-death": [{"reason": "rejected"}]}), body)
    assert dead.reason is reason
    assert dead.headers["sha256"] == hashlib.sha256(body).hexdigest()
    assert dead.headers["size"] == len(body)
    assert len(dead.body) <= max(EXCERPT_BYTES * 4, 70_000)
    assert "\x00" not in dead.body + dead.key + dead.actor
    assert PHONE not in dead.body, "no phone number in clear in the store"


def test_a_huge_body_keeps_an_excerpt_not_the_whole():
    body = b"x" * 2_000_000
    dead = inspect("claims", BasicProperties(), body)
    assert dead.reason is Reason.TOO_LARGE and dead.headers["truncated"]
    assert len(dead.body) == EXCERPT_BYTES
    assert dead.original is None, "an excerpt cannot be replayed"


def test_a_claim_out_of_retries_is_parked_for_replay_and_stored_redacted():
    body = _claim_envelope(options={"retries": 40, "traceback": "Traceback...\nValueError: boom\n"})
    dead = inspect("claims", BasicProperties(message_id="m-1"), orjson.dumps(body))
    assert dead.reason is Reason.RETRIES_EXHAUSTED and dead.detail == "ValueError: boom"
    assert dead.key == body["message_id"]
    assert dead.original is Original.PARKED
    assert PHONE not in dead.body and PHONE[:4] in dead.body


def test_a_message_id_with_a_long_digit_run_is_kept_whole():
    """Replay finds the parked original by the stored key: a UUID that happens
    to hold seven digits in a row must not be masked like a number."""
    message_id = "616ed96f-9921-4c3b-8d7e-a2364212ca35"
    body = _claim_envelope(message_id=message_id, options={"retries": 40, "traceback": "ValueError: x"})
    dead = inspect("claims", BasicProperties(message_id="m-1"), orjson.dumps(body))
    assert dead.key == message_id
    free_text = inspect("claims", BasicProperties(message_id="+8613912345678"), b"[1]")
    assert PHONE not in free_text.key


def test_a_credit_message_is_replayed_from_its_stored_body():
    body = {
        "queue_name": "credits",
        "actor_name": "credit_claim",
        "args": [{"v": 1, "claim_ids": [str(uuid.uuid4())]}],
        "kwargs": {},
        "options": {},
        "message_id": str(uuid.uuid4()),
        "message_timestamp": 1,
    }
    dead = inspect(
        "credits", BasicProperties(headers={"x-death": [{"reason": "rejected"}]}), orjson.dumps(body)
    )
    assert dead.reason is Reason.REJECTED and "rejected" in dead.detail
    assert dead.original is Original.STORED
    assert orjson.loads(dead.body) == body


def test_a_nul_in_the_message_id_is_kept_out_of_the_key():
    dead = inspect("claims", BasicProperties(message_id="a\x00b"), b"junk")
    assert "\x00" not in dead.key
