"""deploy/redis/users.acl against the real Redis: the page's user can run
the fast gate and nothing else, the workers' user can remember grants."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from issuance.producers.web.fastgate import FastGate, Limits, Verdict
from issuance.shared import gate
from issuance.shared.settings import Settings

ACL = Path(__file__).parents[2] / "deploy" / "redis" / "users.acl"


def acl_rules(user: str) -> list[str]:
    for line in ACL.read_text().splitlines():
        words = line.split()
        if words[:2] == ["user", user]:
            return words[2:]
    raise AssertionError(f"no user {user} in {ACL}")


@pytest.fixture
def acl_user(settings: Settings) -> Iterator[Callable[[str], str]]:
    """A throwaway Redis user with a shipped user's rules and a password."""
    admin = redis.Redis.from_url(settings.redis_url)
    made: list[str] = []

    def make(shipped: str) -> str:
        name, password = f"test-{shipped}-{uuid.uuid4().hex[:8]}", secrets.token_hex(16)
        admin.execute_command("ACL", "SETUSER", name, "reset", *acl_rules(shipped), f">{password}")
        made.append(name)
        host_db = settings.redis_url.removeprefix("redis://")
        return f"redis://{name}:{password}@{host_db}"

    yield make
    for name in made:
        admin.execute_command("ACL", "DELUSER", name)


def test_the_page_user_runs_the_gate_and_nothing_else(
    settings: Settings, acl_user: Callable[[str], str]
) -> None:
    url = acl_user("issuance-page")

    async def run() -> list[Verdict]:
        fast = FastGate(url, limits=Limits(100, 100, 10, 10, 60))
        try:

            def check(digest: bytes, share: uuid.UUID | None) -> Any:
                return fast.check_claim(
                    client_ip="203.0.113.9",
                    activity="acl",
                    group="",
                    digest=digest,
                    claim_id=uuid.uuid4(),
                    remaining=5,
                    share_id=share,
                )

            first = await check(b"a" * 32, None)
            share = await check(b"b" * 32, uuid.uuid4())
            over = await fast.over_limit("status", "203.0.113.9", 10, 60)
            return [first, share, Verdict.RATE_IP if over else Verdict.OK]
        finally:
            await fast.close()

    assert asyncio.run(run()) == [Verdict.OK, Verdict.OK, Verdict.OK]
    page = redis.Redis.from_url(url)
    for forbidden in (("FLUSHDB",), ("KEYS", "*"), ("CONFIG", "GET", "*"), ("GET", "other:key")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            page.execute_command(*forbidden)


def test_the_worker_user_remembers_grants(settings: Settings, acl_user: Callable[[str], str]) -> None:
    url = acl_user("issuance-worker")
    client = redis.Redis.from_url(url)
    gate.remember_grants(client, [("acl-activity", "", b"c" * 32)])
    assert redis.Redis.from_url(settings.redis_url).sismember(
        gate.activity_key("acl-activity"), (b"c" * 32).hex()
    )
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.execute_command("FLUSHDB")


def test_the_default_user_is_off_and_no_user_has_a_password() -> None:
    text = ACL.read_text()
    assert "user default off" in text
    for line in text.splitlines():
        if line.startswith("user "):
            assert not any(word.startswith((">", "#")) or word == "nopass" for word in line.split()), line
