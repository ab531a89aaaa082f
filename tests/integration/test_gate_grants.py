"""The gate's grant bookkeeping: a batch's grants reach Redis as one SADD
and one EXPIRE per key, not four commands per claim."""

from __future__ import annotations

import hashlib

import pytest
import redis
from issuance.shared import gate
from issuance.shared.settings import Settings


def test_a_batch_of_grants_is_one_sadd_and_one_expire_per_key(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[list[str]] = []
    execute = redis.client.Pipeline.execute

    def recording(self, *args, **kwargs):
        sent.append([str(command[0][0]) for command in self.command_stack])
        return execute(self, *args, **kwargs)

    monkeypatch.setattr(redis.client.Pipeline, "execute", recording)
    client = redis.Redis.from_url(settings.redis_url)
    digests = [hashlib.sha256(str(n).encode()).digest() for n in range(100)]
    grants = [("act-a" if n % 2 else "act-b", "group", d) for n, d in enumerate(digests)]
    gate.remember_grants(client, grants)
    assert sorted(sent[0]) == ["EXPIRE"] * 3 + ["SADD"] * 3
    assert client.scard(gate.activity_key("act-a")) == client.scard(gate.activity_key("act-b")) == 50
    assert {bytes.fromhex(m.decode()) for m in client.smembers(gate.group_key("group"))} == set(digests)
    for key in (gate.activity_key("act-a"), gate.activity_key("act-b"), gate.group_key("group")):
        assert 0 < client.ttl(key) <= gate.TTL_SECONDS
