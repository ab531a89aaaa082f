"""Signed messages end to end: with ISSUANCE_SIGNING_KEYS set, the workers
run what producers signed (and sign their own credit messages), refuse
unsigned, forged and piped messages into the dead-letter store, and retry a
message signed with a key they do not know yet until it arrives."""

from __future__ import annotations

import time
import uuid

import orjson
import pika
import psycopg
import pytest
from issuance.shared.wire import codec, signing
from issuance.shared.wire.publisher import RabbitPublisher

from tests.conftest import claim, make_activity, take_all, verify_clean
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


def _refused(settings) -> dict[str, int]:
    with psycopg.connect(settings.database_url) as conn:
        return dict(conn.execute("SELECT reason, count(*) FROM dead_letters GROUP BY reason").fetchall())


def _stop_and_purge(workers, settings) -> None:
    """Leave no message retrying for the next test of the session's vhost."""
    workers.stop()
    for queue in ("claims", "claims.DQ", "credits", "credits.DQ"):
        take_all(settings, queue)


def test_signed_claims_run_and_unsigned_or_forged_ones_are_refused(settings, start_workers, signed):
    act = make_activity(settings)
    workers = start_workers(queues=["claims", "credits"], ISSUANCE_SIGNING_KEYS=KEYS)
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

    found = wait_for(
        lambda: sum(_refused(settings).values()) == 2 and _refused(settings), what="two refusals"
    )
    assert found == {"unsigned": 1, "bad_signature": 1}
    # The one signed with a key the workers do not know is being retried, not dropped.
    with psycopg.connect(settings.database_url) as conn:
        bodies = [r[0] for r in conn.execute("SELECT body FROM dead_letters")]
        ids = {r[0] for r in conn.execute("SELECT claim_id FROM claims")}
    assert "+8613900000001" not in "".join(bodies)
    assert len(ids) == 2, "no refused or retried message reached the handler"
    verify_clean(settings)
    _stop_and_purge(workers, settings)
    assert orjson.loads(codec.dumps(codec.envelope(good)))["options"]["signature"]["kid"] == "k2"


def test_a_claim_piped_inside_an_old_signed_envelope_never_runs(settings, start_workers, signed):
    """The bypass of issue 19: an already processed signed claim, re-published
    with an unsigned claim for another number in ``options.pipe_target``."""
    act = make_activity(settings)
    start_workers(queues=["claims", "credits"], ISSUANCE_SIGNING_KEYS=KEYS)
    old = codec.envelope(claim(act["slug"], "+8613900000001"))
    _publish_raw(settings, codec.dumps(old))
    wait_for(lambda: claim_states(settings).get("credited") == 1, what="the genuine claim credited")

    victim = {**codec.envelope(claim(act["slug"], "+8613900000002")), "options": {"pipe_ignore": True}}
    replayed = {**old, "options": {**old["options"], "pipe_target": victim}}
    _publish_raw(settings, codec.dumps(replayed))

    wait_for(
        lambda: _refused(settings) or claim_states(settings).get("credited", 0) > 1,
        what="the replayed envelope refused, or the piped claim credited",
    )
    time.sleep(2)  # time enough for a piped claim to run, had it been let through
    assert claim_states(settings) == {"credited": 1}, "the piped claim for another number ran"
    assert _refused(settings) == {"forbidden_option": 1}
    verify_clean(settings)


def test_a_rotation_rolled_out_in_the_wrong_order_loses_no_claim(settings, start_workers, signed):
    """The page signs with a new key before the workers have it: the claim is
    retried, not dead-lettered, and credited once the workers learn the key."""
    act = make_activity(settings)
    workers = start_workers(queues=["claims", "credits"], ISSUANCE_SIGNING_KEYS=KEYS)
    new_key = "k3:third-signing-secret-00001"
    early = signing.sign_envelope(
        {**codec.envelope(claim(act["slug"])), "options": {}}, signing.parse_keys(new_key)
    )
    _publish_raw(settings, codec.dumps(early))
    time.sleep(4)  # several retries (backoff 0.1 s to 1 s in the tests)
    assert (claim_states(settings), _refused(settings)) == ({}, {})
    workers.stop()
    start_workers(queues=["claims", "credits"], ISSUANCE_SIGNING_KEYS=f"{KEYS},verify-only:{new_key}")
    wait_for(lambda: claim_states(settings).get("credited") == 1, what="the early claim credited")
    assert _refused(settings) == {}
    verify_clean(settings)
