"""Signed messages end to end: with ISSUANCE_SIGNING_KEYS set, the workers
run what producers signed (and sign their own credit messages), and refuse
unsigned, forged and unknown-key messages into the dead-letter store."""

from __future__ import annotations

import uuid

import orjson
import pika
import psycopg
import pytest
from issuance.shared.wire import codec, signing
from issuance.shared.wire.publisher import RabbitPublisher

from tests.conftest import claim, make_activity, verify_clean
from tests.e2e.conftest import claim_states, wait_for

KEYS = "k2:second-signing-secret-0001,k1:first-signing-secret-00001"


@pytest.fixture
def signed(monkeypatch):
    monkeypatch.setenv(signing.ENV, KEYS)
    signing.use_keys(None)
    yield
    signing.use_keys(signing.NO_KEYS)
    monkeypatch.delenv(signing.ENV)
    signing.use_keys(None)


def _publish_raw(settings, body: bytes) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = connection.channel()
    channel.queue_declare("claims", durable=True, arguments=codec.queue_arguments("claims"))
    channel.basic_publish(
        "", "claims", body, pika.BasicProperties(delivery_mode=2, message_id=str(uuid.uuid4()))
    )
    connection.close()


def test_signed_claims_run_and_unsigned_or_forged_ones_are_refused(settings, start_workers, signed):
    act = make_activity(settings)
    start_workers(queues=["claims", "credits"], ISSUANCE_SIGNING_KEYS=KEYS)
    unsigned = {**codec.envelope(claim(act["slug"])), "options": {}}
    forged = codec.envelope(claim(act["slug"]))
    forged["args"][0]["phone"] = "+8613900000001"  # changed after signing
    foreign = signing.sign_envelope(
        {**codec.envelope(claim(act["slug"])), "options": {}},
        signing.parse_keys("k9:some-other-secret-000000"),
    )
    old_key = signing.sign_envelope(
        {**codec.envelope(claim(act["slug"])), "options": {}},
        signing.parse_keys("k1:first-signing-secret-00001"),
    )
    for env in (unsigned, forged, foreign, old_key):
        _publish_raw(settings, codec.dumps(env))
    good = claim(act["slug"])
    with RabbitPublisher.from_settings(settings) as publisher:
        publisher.publish(good)
    # The good claim and the one signed with the older, still listed key are
    # credited: their credit messages were signed by the worker.
    wait_for(lambda: claim_states(settings).get("credited") == 2, what="two signed claims credited")

    def refused():
        with psycopg.connect(settings.database_url) as conn:
            return dict(conn.execute("SELECT reason, count(*) FROM dead_letters GROUP BY reason").fetchall())

    found = wait_for(lambda: sum(refused().values()) == 3 and refused(), what="three refusals")
    assert found == {"unsigned": 1, "bad_signature": 1, "unknown_signing_key": 1}
    with psycopg.connect(settings.database_url) as conn:
        bodies = [r[0] for r in conn.execute("SELECT body FROM dead_letters")]
        ids = {r[0] for r in conn.execute("SELECT claim_id FROM claims")}
    assert "+8613900000001" not in "".join(bodies)
    assert len(ids) == 2, "no refused message reached the handler"
    verify_clean(settings)
    assert orjson.loads(codec.dumps(codec.envelope(good)))["options"]["signature"]["kid"] == "k2"
