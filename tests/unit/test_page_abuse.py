"""The page's defences that need no service: networks, the in-process
limiter, the challenge policy, status tokens, an abandoned request."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import pytest
from issuance.producers.web.app import ActivityPageApp
from issuance.producers.web.challenge import (
    Challenge,
    ChallengePolicy,
    ChallengeSettingError,
    ClaimRate,
    NotConfigured,
    VerifierUnavailable,
)
from issuance.producers.web.limits import Limit, LocalLimiter, network_of
from issuance.producers.web.security import status_key, status_token, token_cell, token_matches
from issuance.shared.settings import Settings
from starlette.requests import Request

KEY = "unit-test-phone-key-0123456789"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("address", "network"),
    [
        ("203.0.113.77", "203.0.113.0/24"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.77", "203.0.113.0/24"),
        ("testclient", "testclient"),
    ],
)
def test_network_of(address: str, network: str) -> None:
    assert network_of(address) == network


def test_local_limiter_allows_the_window_average_and_refills() -> None:
    clock = Clock()
    limiter = LocalLimiter(clock=clock)
    per_ip = Limit(kind="ip", count=3, window_seconds=60)
    assert [limiter.allow([(per_ip, "a")]) for _ in range(4)] == [None, None, None, per_ip]
    assert limiter.allow([(per_ip, "b")]) is None  # another address has its own bucket
    clock.now += 20  # a third of the window: one token back
    assert limiter.allow([(per_ip, "a")]) is None
    assert limiter.allow([(per_ip, "a")]) is per_ip


def test_local_limiter_takes_nothing_when_one_check_fails() -> None:
    limiter = LocalLimiter(clock=Clock())
    per_ip = Limit(kind="ip", count=5, window_seconds=60)
    per_phone = Limit(kind="phone", count=1, window_seconds=60)
    assert limiter.allow([(per_ip, "a"), (per_phone, "n")]) is None
    for _ in range(4):
        assert limiter.allow([(per_ip, "a"), (per_phone, "n")]) is per_phone
    assert limiter.allow([(per_ip, "a"), (per_phone, "m")]) is None  # the address kept its tokens


def test_local_limiter_memory_is_bounded() -> None:
    limiter = LocalLimiter(max_keys=100, clock=Clock())
    per_ip = Limit(kind="ip", count=1, window_seconds=60)
    for i in range(10_000):
        limiter.allow([(per_ip, f"10.{i // 256}.{i % 256}.1")])
    assert len(limiter) == 100


@pytest.mark.parametrize(
    ("raw", "policy"),
    [
        ("", ChallengePolicy()),
        ("off", ChallengePolicy()),
        ("always", ChallengePolicy(always=True)),
        ("above:50", ChallengePolicy(above=50)),
    ],
)
def test_challenge_setting(raw: str, policy: ChallengePolicy) -> None:
    assert ChallengePolicy.parse(raw) == policy


@pytest.mark.parametrize("raw", ["on", "above:", "above:x", "below:3"])
def test_challenge_setting_refuses_anything_else(raw: str) -> None:
    with pytest.raises(ChallengeSettingError, match="off, always or above:N"):
        ChallengePolicy.parse(raw)


def test_challenge_above_a_rate_counts_a_sliding_minute() -> None:
    clock = Clock()
    challenge = Challenge(ChallengePolicy(above=2))
    challenge.rate = ClaimRate(2, clock)
    assert [challenge.required() for _ in range(3)] == [False, False, True]
    clock.now += 61
    assert challenge.required() is False
    assert Challenge(ChallengePolicy()).required() is False
    assert Challenge(ChallengePolicy(always=True)).required() is True


def test_the_shipped_verifier_refuses_honestly() -> None:
    with pytest.raises(VerifierUnavailable, match="no challenge provider is configured"):
        NotConfigured().verify(answer="123456", phone="+8613800138000", client_ip="203.0.113.1")


def test_status_tokens_belong_to_one_claim_under_one_key() -> None:
    key = status_key(KEY)
    claim, other = uuid.uuid4(), uuid.uuid4()
    token = status_token(key, claim)
    assert token_matches(key, claim, token)
    assert not token_matches(key, other, token)
    assert not token_matches(status_key(KEY + "x"), claim, token)
    assert not token_matches(key, claim, None)
    assert not token_matches(key, claim, "é" * 64)
    # Domain separation: the status key is not the phone key, nor a digest under it.
    assert key != KEY.encode() and len(key) == 32


def test_a_status_token_names_its_cell_under_the_signature() -> None:
    key = status_key(KEY)
    claim = uuid.uuid4()
    token = status_token(key, claim, 2)
    assert token.startswith("2.") and token_cell(token) == 2
    assert token_matches(key, claim, token)
    # Another cell number with the same signature is another token.
    assert not token_matches(key, claim, "1" + token[1:])
    # A token made before the cell map still reads the claim (every cell is asked).
    assert token_matches(key, claim, status_token(key, claim))
    assert token_cell(status_token(key, claim)) is None
    assert token_cell("²." + token[2:]) is None and token_cell(None) is None


def test_a_client_gone_mid_body_is_one_debug_line(caplog: pytest.LogCaptureFixture) -> None:
    page = ActivityPageApp(Settings(phone_key=KEY))
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": "/api/claims",
        "headers": [(b"content-type", b"application/json"), (b"host", b"127.0.0.1:8000")],
    }

    async def gone() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    caplog.set_level(logging.DEBUG, logger="issuance")  # whatever an earlier test configured
    answer = asyncio.run(page.request_claim(Request(scope, gone)))
    assert answer.status_code == 400
    records = [r for r in caplog.records if r.name.startswith("issuance")]
    assert [(r.levelno, r.exc_info) for r in records] == [(logging.DEBUG, None)]
