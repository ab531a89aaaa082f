"""A full pipeline run with the workers logging at DEBUG (Dramatiq then logs
every message with its arguments): no phone number appears in clear."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import orjson
import pika
from issuance.shared.wire.codec import envelope, queue_arguments
from issuance.shared.wire.publisher import RabbitPublisher

from tests.conftest import claim, make_activity, verify_clean
from tests.e2e.conftest import ROOT, claim_states, consumers, wait_for


def test_worker_logs_hold_no_phone_number_in_clear(service_env, settings, tmp_path):
    act = make_activity(settings, budget=40, codes=40)
    numbers = [f"+86139{n:08d}" for n in range(10_000_001, 10_000_021)]
    formats = [
        *numbers[:10],
        *(n[3:] for n in numbers[10:15]),
        *(f"{n[:6]} {n[6:10]} {n[10:]}" for n in numbers[15:]),
    ]
    claims = [claim(act["slug"], phone) for phone in formats]
    claims += [claim(act["slug"], f"+1555{n:07d}") for n in range(3)]  # refused: not a mobile number
    log = tmp_path / "workers.log"
    env = {**os.environ, **service_env}
    argv = [
        sys.executable,
        "-m",
        "dramatiq",
        "issuance.workers.actors",
        "-p",
        "1",
        "-t",
        "2",
        "-v",
        "--queues",
        "claims",
        "credits",
    ]
    proc = subprocess.Popen(
        argv, env=env, cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wait_for(lambda: consumers(settings, "claims") >= 1, what="workers consuming")
        with RabbitPublisher.from_settings(settings) as publisher:
            publisher.publish_many(claims)
        bad = envelope(claims[0])
        bad["args"] = [{**claims[0].to_payload(), "phone": "+8613900000099", "requested_at": "yesterday"}]
        connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
        channel = connection.channel()
        channel.queue_declare("claims", durable=True, arguments=queue_arguments("claims"))
        channel.basic_publish("", "claims", orjson.dumps(bad), pika.BasicProperties(delivery_mode=2))
        connection.close()
        wait_for(
            lambda: (
                sum(claim_states(settings).values()) == len(claims)
                and not claim_states(settings).get("bound")
            ),
            timeout=120,
            what="every claim decided and credited",
        )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    text = log.read_text(errors="replace")
    # The test can fail: at DEBUG, Dramatiq logs each message with its payload.
    assert text.count("Received message") >= len(claims), text[-2000:]
    digits = re.sub(r"[^0-9]", "", text)
    leaked = [n for n in [*numbers, "+8613900000099"] if n[3:] in digits or n[1:] in text]
    assert not leaked, f"{len(leaked)} numbers in clear in the worker log"
    assert "phone" in text  # the payloads were logged, masked
    verify_clean(settings)
