"""Phone key rotation with a key ID per digest (deploy/SECURITY.md): a number
stays one member while the key changes, members are re-keyed from a list of
numbers, and the page's gate knows the number under every configured key."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import psycopg
import pytest
import redis
from issuance.producers.web.fastgate import FastGate, Limits, Verdict
from issuance.shared import cli, gate
from issuance.shared.db import fingerprints, rekey
from issuance.shared.domain import Refusal, phone_digest
from issuance.shared.settings import PhoneKeyError, Settings, require_phone_keys
from issuance.workers.handlers import handle_claim

from tests.conftest import claim, make_activity, verify_clean

NEW_KEY = "the-next-phone-key-0123456789"
NUMBER = "+8613800138000"


def _steps(settings: Settings) -> tuple[Settings, Settings, Settings]:
    """The three steps from the single key (ID 1) to key 2."""
    lookup = dataclasses.replace(settings, phone_keys=f"2:{NEW_KEY}")
    current = dataclasses.replace(lookup, phone_key_id="2")
    retired = dataclasses.replace(current, phone_key="")
    return lookup, current, retired


def _members(settings: Settings) -> list[tuple[bytes, str]]:
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute("SELECT phone_digest, phone_key_id FROM members ORDER BY member_id")
        return [(bytes(d), k) for d, k in rows]


def test_the_same_number_after_a_key_change_is_the_same_member(settings, pool):
    act = make_activity(settings, codes=10)
    first = handle_claim(pool, settings, claim(act["slug"], NUMBER))
    assert first.status == "credited"
    lookup, current, _ = _steps(settings)
    for step in (lookup, current):  # rolled out to every worker, step by step
        with psycopg.connect(settings.database_url) as conn:
            fingerprints.check_phone_key(conn, step)
        again = handle_claim(pool, step, claim(act["slug"], NUMBER))
        assert (again.status, again.reason) == ("refused", Refusal.ALREADY_RECEIVED)
    # One member, now under the current key: the old key can go for this number.
    assert _members(settings) == [(phone_digest(NUMBER, NEW_KEY), "2")]
    other = handle_claim(pool, current, claim(act["slug"], "+8613800138001"))
    assert other.status == "credited"
    assert _members(settings)[1] == (phone_digest("+8613800138001", NEW_KEY), "2")
    report = verify_clean(settings)
    assert report["counts"]["credited"] == 2


def test_a_key_id_names_one_secret_for_good(settings):
    lookup, current, _ = _steps(settings)
    with psycopg.connect(settings.database_url) as conn:
        fingerprints.check_phone_key(conn, current)
        with pytest.raises(
            fingerprints.PhoneKeyMismatch, match="ISSUANCE_PHONE_KEYS entry '2' is not the key"
        ):
            fingerprints.check_phone_key(conn, dataclasses.replace(current, phone_keys="2:" + "x" * 20))
        names = sorted(r[0] for r in conn.execute("SELECT name FROM key_fingerprints"))
    assert names == ["phone_key", "phone_key:2"]
    with pytest.raises(PhoneKeyError, match="must name one of the phone keys"):
        require_phone_keys(dataclasses.replace(lookup, phone_key_id="3"))
    assert require_phone_keys(settings).ids == ("1",)  # the single-key form, as before


def test_rekey_moves_listed_members_once_and_the_gate_follows(
    settings, pool, tmp_path, monkeypatch, service_env
):
    act = make_activity(settings, codes=10)
    numbers = [f"+86138001380{i:02d}" for i in range(5)]
    for number in numbers:
        assert handle_claim(pool, settings, claim(act["slug"], number)).status == "credited"
    _, current, retired = _steps(settings)
    listed = tmp_path / "numbers.txt"
    listed.write_text("\n".join([*numbers[:3], "not a number", "+8613900000000", ""]) + "\n")
    for name, value in {
        **service_env,
        "ISSUANCE_PHONE_KEYS": f"2:{NEW_KEY}",
        "ISSUANCE_PHONE_KEY_ID": "2",
    }.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["phone-keys", "rekey", str(listed), "--batch-size", "2"]) == 0
    with psycopg.connect(settings.database_url) as conn:
        counts = {c.key_id: (c.members, c.role) for c in rekey.members_per_key(conn, current)}
        assert counts == {"2": (3, "current"), "1": (2, "older")}
        again = rekey.rekey(conn, None, current, listed.read_text().splitlines())
    assert (again.numbers, again.invalid, again.rekeyed) == (5, 1, 0)  # idempotent
    sets = redis.Redis.from_url(settings.redis_url)
    moved = {phone_digest(n, NEW_KEY).hex().encode() for n in numbers[:3]}
    assert moved <= sets.smembers(gate.activity_key(act["slug"]))
    # Step 3: key 1 retired. The listed numbers are still the members they were.
    for number in numbers[:3]:
        refused = handle_claim(pool, retired, claim(act["slug"], number))
        assert (refused.status, refused.reason) == ("refused", Refusal.ALREADY_RECEIVED)
    assert len(_members(settings)) == 5
    verify_clean(settings)


def test_the_page_gate_knows_a_number_under_every_configured_key(settings):
    old, new = phone_digest(NUMBER, settings.phone_key), phone_digest(NUMBER, NEW_KEY)
    gate.remember_grants(redis.Redis.from_url(settings.redis_url), [("spring", "g", old)])

    async def run() -> list[Verdict]:
        fast = FastGate(settings.redis_url, limits=Limits(100, 100, 2, 0, 60))
        check = dict(client_ip="198.51.100.7", activity="summer", group="g", remaining=10)
        try:
            return [
                # A page on step 2 (key 2 current, key 1 still listed) finds
                # the grant made under key 1.
                await fast.check_claim(**check, digest=new, claim_id=uuid.uuid4(), older_digests=[old]),
                await fast.check_claim(**check, digest=new, claim_id=uuid.uuid4(), older_digests=[old]),
                # The per-number limit counts under every key: pages still on
                # step 1, and pages on step 3, see the attempts made on step 2.
                await fast.check_claim(**check, digest=old, claim_id=uuid.uuid4(), older_digests=[new]),
                await fast.check_claim(**check, digest=new, claim_id=uuid.uuid4()),
            ]
        finally:
            await fast.close()

    assert asyncio.run(run()) == [
        Verdict.SIMILAR_ACTIVITY,
        Verdict.SIMILAR_ACTIVITY,
        Verdict.RATE_PHONE,
        Verdict.RATE_PHONE,
    ]


def test_workers_on_either_side_of_step_two_make_a_new_number_one_member(settings, pool):
    """While step 2 rolls out, some workers make new digests with key 1,
    others with key 2: the same new number claimed on both at once is still
    one member with one package."""
    from concurrent.futures import ThreadPoolExecutor

    act = make_activity(settings, budget=200, codes=200)
    lookup, current, _ = _steps(settings)
    numbers = [f"+86139{i:08d}" for i in range(40)]
    with ThreadPoolExecutor(max_workers=8) as threads:
        outcomes = list(
            threads.map(
                lambda job: handle_claim(pool, job[0], claim(act["slug"], job[1])),
                [(step, number) for number in numbers for step in (lookup, current)],
            )
        )
    assert sorted(o.status for o in outcomes) == ["credited"] * 40 + ["refused"] * 40
    assert len(_members(settings)) == 40
    verify_clean(settings)
