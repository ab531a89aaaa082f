from __future__ import annotations

import psycopg
import redis
from issuance.shared.errors import InvalidMessage, TransientError
from issuance.workers.broker import RetryPolicy


def test_outages_are_waited_out_and_bugs_are_bounded():
    policy = RetryPolicy(max_retries=3)
    for outage in (psycopg.OperationalError("down"), redis.ConnectionError("down"), TransientError("busy")):
        assert policy(10_000, outage), "an outage never exhausts the retries"
    assert policy(2, ValueError("bug"))
    assert not policy(3, ValueError("bug"))
    assert not policy(3, InvalidMessage("bad_field", "x"))
