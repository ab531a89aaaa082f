"""Draining and replaying dead letters on the real RabbitMQ and PostgreSQL:
no envelope jams the drain, and a replay happens once."""

from __future__ import annotations

import uuid

import orjson
import pika
import psycopg
import pytest
from issuance.shared import cli
from issuance.shared.db.dead_letters import Selection, drain, parked_name, replay
from issuance.shared.wire.codec import envelope, queue_arguments, xq_arguments

from tests.conftest import claim, take_all
from tests.unit.test_dead_letters import BAD_SHAPES, PHONE


@pytest.fixture(autouse=True)
def _empty_queues(settings) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        channel = connection.channel()
        for queue in ("claims", "credits"):
            channel.queue_declare(queue, durable=True, arguments=queue_arguments(queue))
            for name in (f"{queue}.XQ", parked_name(queue)):
                channel.queue_declare(name, durable=True, arguments=xq_arguments())
            for name in (queue, f"{queue}.XQ", parked_name(queue)):
                channel.queue_purge(name)
    finally:
        connection.close()


def _dead_letter(settings, queue: str, body: bytes, **properties) -> None:
    """Put ``body`` where RabbitMQ dead-letters a rejected ``queue`` message."""
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        channel = connection.channel()
        channel.queue_declare(f"{queue}.XQ", durable=True, arguments=xq_arguments())
        channel.basic_publish("", f"{queue}.XQ", body, pika.BasicProperties(delivery_mode=2, **properties))
    finally:
        connection.close()


def _rows(settings) -> list[tuple]:
    with psycopg.connect(settings.database_url) as conn:
        return conn.execute(
            "SELECT dead_letter_id, reason, actor, body, headers FROM dead_letters ORDER BY dead_letter_id"
        ).fetchall()


def test_every_bad_envelope_is_drained_with_its_reason_and_none_jams(settings, pool):
    for body, _reason in BAD_SHAPES.values():
        _dead_letter(settings, "claims", body, message_id=str(uuid.uuid4()))
    good = envelope(claim("spring", PHONE))
    good["options"] = {"retries": 40, "traceback": "ValueError: boom"}
    _dead_letter(settings, "claims", orjson.dumps(good))

    assert drain(settings, pool) == len(BAD_SHAPES) + 1
    assert drain(settings, pool) == 0, "a second drain finds the queue empty"
    rows = _rows(settings)
    reasons = sorted(r[1] for r in rows)
    assert reasons == sorted([str(reason) for _, reason in BAD_SHAPES.values()] + ["retries_exhausted"])
    assert not any(PHONE in r[3] for r in rows), "no phone number in clear in the store"
    huge = next(r for r in rows if r[1] == "too_large")
    assert huge[4]["size"] > 2_000_000 and len(huge[3]) <= 4096 and len(huge[4]["sha256"]) == 64
    assert take_all(settings, "claims.XQ") == []


def test_a_replay_republishes_the_original_once(settings, pool):
    lost = envelope(claim("spring", PHONE))
    lost["options"] = {"retries": 40, "traceback": "ValueError: boom"}
    credit = {
        "queue_name": "credits",
        "actor_name": "credit_claim",
        "args": [{"v": 1, "claim_ids": [str(uuid.uuid4())]}],
        "kwargs": {},
        "options": {"retries": 3},
        "message_id": str(uuid.uuid4()),
        "message_timestamp": 1,
    }
    _dead_letter(settings, "claims", orjson.dumps(lost))
    _dead_letter(settings, "credits", orjson.dumps(credit))
    _dead_letter(settings, "claims", b"not an envelope")
    assert drain(settings, pool) == 3
    ids = {r[1] + ":" + r[2]: r[0] for r in _rows(settings)}

    result = replay(settings, pool, Selection(reason="retries_exhausted"))
    assert sorted(result.replayed) == sorted(
        [ids["retries_exhausted:claim_requested"], ids["retries_exhausted:credit_claim"]]
    )
    claims = take_all(settings, "claims")
    credits = take_all(settings, "credits")
    assert len(claims) == 1 and len(credits) == 1
    replayed = orjson.loads(claims[0][1])
    assert replayed["args"] == orjson.loads(orjson.dumps(lost))["args"], (
        "the original, phone number included, not the redacted copy"
    )
    assert replayed["message_id"] == lost["message_id"] and replayed["options"] == {}
    assert orjson.loads(credits[0][1])["args"] == credit["args"]
    assert take_all(settings, parked_name("claims")) == [], "a replayed original leaves the parking queue"

    again = replay(settings, pool, Selection(reason="retries_exhausted"))
    assert again.replayed == [] and take_all(settings, "claims") == []

    garbage = replay(settings, pool, Selection(ids=[ids["undecodable_envelope:?"]]))
    assert garbage.replayed == [] and "excerpt" in garbage.skipped[ids["undecodable_envelope:?"]]


def test_a_failed_replay_marks_nothing_and_keeps_the_original(settings, pool):
    lost = envelope(claim("spring", PHONE))
    lost["options"] = {"retries": 40}
    _dead_letter(settings, "claims", orjson.dumps(lost))
    drain(settings, pool)
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = connection.channel()
    # The claims queue exists with other arguments: the replay's declaration fails.
    channel.queue_delete("claims")
    channel.queue_declare("claims", durable=True, arguments={"x-max-length": 5})
    connection.close()
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker):
            replay(settings, pool, Selection(queue="claims"))
    finally:
        connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
        connection.channel().queue_delete("claims")
        connection.channel().queue_declare("claims", durable=True, arguments=queue_arguments("claims"))
        connection.close()
    assert len(take_all(settings, parked_name("claims"))) == 1, "the original is still parked"
    assert "replayed_at" not in _rows(settings)[0][4]


def test_list_shows_ids_and_whole_details(settings, pool, capsys, monkeypatch, service_env):
    for name, value in service_env.items():
        monkeypatch.setenv(name, value)
    long_detail = "x" * 300
    lost = envelope(claim("spring", PHONE))
    lost["options"] = {"retries": 40, "traceback": long_detail}
    _dead_letter(settings, "claims", orjson.dumps(lost))
    drain(settings, pool)
    from issuance.shared.settings import load_settings

    load_settings.cache_clear()
    try:
        assert cli.main(["dead-letters", "list"]) == 0
    finally:
        load_settings.cache_clear()
    out = capsys.readouterr().out
    dead_letter_id = _rows(settings)[0][0]
    assert out.startswith(f"{dead_letter_id} | ") and "retries_exhausted" in out and long_detail in out


def test_replay_without_a_choice_is_refused_on_one_line(settings, capsys, monkeypatch, service_env):
    for name, value in service_env.items():
        monkeypatch.setenv(name, value)
    from issuance.shared.settings import load_settings

    load_settings.cache_clear()
    try:
        assert cli.main(["dead-letters", "replay"]) == 2
    finally:
        load_settings.cache_clear()
    err = capsys.readouterr().err
    assert "choose the dead letters to replay" in err and "Traceback" not in err
