"""Messages, their validation and the wire codec."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import jsonschema
import orjson
import pytest
from dramatiq import Message as DramatiqMessage
from dramatiq.errors import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st
from issuance.shared.errors import InvalidMessage
from issuance.shared.wire import codec
from issuance.shared.wire.messages import MESSAGE_TYPES, ClaimRequested, OrderPlaced, new_claim_id, utcnow

SCHEMAS = Path(__file__).parents[2] / "shared" / "issuance" / "shared" / "wire" / "schemas"


@pytest.mark.parametrize("type_", sorted(MESSAGE_TYPES))
def test_examples_validate_against_the_schema_and_decode(type_):
    message_type = MESSAGE_TYPES[type_]
    schema = message_type.json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(dict(message_type.EXAMPLE), schema)
    message = message_type.from_payload(dict(message_type.EXAMPLE))
    # Round trip through the wire form.
    payload = orjson.loads(orjson.dumps(message.to_payload()))
    assert message_type.from_payload(payload) == message


@pytest.mark.parametrize("type_", sorted(MESSAGE_TYPES))
def test_published_schemas_match_the_code(type_):
    message_type = MESSAGE_TYPES[type_]
    path = SCHEMAS / f"{type_}.v{message_type.VERSION}.json"
    assert json.loads(path.read_text()) == json.loads(json.dumps(message_type.json_schema())), (
        "run `issuance schemas` and commit the result"
    )


def test_envelope_is_dramatiqs_and_round_trips_through_the_encoder():
    message = ClaimRequested.from_payload(dict(ClaimRequested.EXAMPLE))
    body = codec.encode(message)
    fields = codec.OrjsonEncoder().decode(body)
    decoded = DramatiqMessage(**fields)
    assert (decoded.queue_name, decoded.actor_name) == ("claims", "claim_requested")
    assert codec.decode_payload(decoded.actor_name, decoded.args[0]) == message
    assert decoded.message_id == codec.message_id_for(message), "a re-send keeps its message ID"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"queue_name": "claims"}',
        b'{"queue_name":"claims","actor_name":"x","args":{}}',
        b'{"queue_name":"claims","actor_name":"x","args":[],"extra":1}',
        b"x" * 70_000,
    ],
)
def test_malformed_envelopes_fail_to_decode_cleanly(body):
    with pytest.raises(DecodeError):
        codec.OrjsonEncoder().decode(body)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"v": 2}, "unknown_version"),
        ({"extra": 1}, "unknown_field"),
        ({"claim_id": "nope"}, "bad_field"),
        ({"requested_at": "2026-11-11T00:00:00"}, "bad_field"),
        ({"activity": "Not A Slug"}, "bad_field"),
        ({"phone": 13800138000}, "bad_field"),
    ],
)
def test_invalid_payloads_name_their_reason(change, reason):
    payload = {**ClaimRequested.EXAMPLE, **change}
    with pytest.raises(InvalidMessage) as info:
        ClaimRequested.from_payload(payload)
    assert info.value.reason == reason


def test_missing_fields_and_absurd_amounts_are_refused():
    payload = dict(OrderPlaced.EXAMPLE)
    del payload["order_id"]
    with pytest.raises(InvalidMessage, match="missing_field"):
        OrderPlaced.from_payload(payload)
    for amount in (-1, 10**12, True, 1.5):
        with pytest.raises(InvalidMessage, match="amount_cents"):
            OrderPlaced.from_payload({**OrderPlaced.EXAMPLE, "amount_cents": amount})


def test_unknown_actor_is_refused():
    with pytest.raises(InvalidMessage, match="unknown_actor"):
        codec.decode_payload("drop_tables", {})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)


@settings(max_examples=300)
@given(type_=st.sampled_from(sorted(MESSAGE_TYPES)), junk=st.dictionaries(st.text(max_size=12), json_values))
def test_arbitrary_payloads_are_decoded_or_refused_never_crash(type_, junk):
    message_type = MESSAGE_TYPES[type_]
    for payload in (junk, {**message_type.EXAMPLE, **junk}):
        try:
            message = message_type.from_payload(payload)
        except InvalidMessage as exc:
            assert exc.reason in {
                "bad_payload",
                "unknown_version",
                "unknown_field",
                "missing_field",
                "bad_field",
            }
        else:
            assert isinstance(message, message_type)


def test_queue_arguments_match_dramatiqs_broker():
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker = RabbitmqBroker.__new__(RabbitmqBroker)
    broker.max_priority = None
    for queue in codec.QUEUES:
        assert broker._build_queue_arguments(queue) == codec.queue_arguments(queue)


def test_message_ids_are_stable_per_business_key():
    claim_id = uuid.uuid4()
    a = ClaimRequested.from_payload({**ClaimRequested.EXAMPLE, "claim_id": str(claim_id)})
    b = ClaimRequested.from_payload({**ClaimRequested.EXAMPLE, "claim_id": str(claim_id)})
    assert codec.message_id_for(a) == codec.message_id_for(b)


def test_new_claim_ids_are_time_ordered_uuids_that_travel_as_any_other():
    ids = [new_claim_id() for _ in range(2000)]
    assert all(type(i) is uuid.UUID and i.version == 7 for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)  # in order, within a millisecond too
    claim = ClaimRequested(
        claim_id=ids[0], activity="double-eleven", phone="+8613800138000", requested_at=utcnow()
    )
    decoded = codec.decode_payload("claim_requested", orjson.loads(orjson.dumps(claim.to_payload())))
    assert decoded == claim
