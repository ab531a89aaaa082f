"""Races: many deliveries of one claim, one number from many threads and
processes, many claimants for the last packages and codes. The database
decides; `issuance verify` must stay clean."""

from __future__ import annotations

import dataclasses
import multiprocessing
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from issuance.shared.db import database
from issuance.shared.domain import Refusal
from issuance.shared.settings import Settings
from issuance.shared.wire.messages import CreditRequested
from issuance.workers.handlers import ClaimOutcome, handle_claim, handle_claims, handle_credit

from tests.conftest import claim, make_activity, verify_clean


def _race(pool, settings, messages, workers=16) -> list[ClaimOutcome]:
    with ThreadPoolExecutor(workers) as executor:
        return list(executor.map(lambda m: handle_claim(pool, settings, m), messages))


@pytest.mark.parametrize("inline", [True, False], ids=["credited-inline", "credit-step"])
def test_the_same_claim_delivered_by_many_threads_at_once_binds_once(settings, pool, inline):
    act = make_activity(settings, templates=2)
    message = claim(act["slug"])
    settings = dataclasses.replace(settings, credit_inline=inline)
    outcomes = _race(pool, settings, [message] * 32)
    assert sum(not o.duplicate for o in outcomes) == 1
    assert {o.status for o in outcomes} == {"credited" if inline else "bound"}
    with ThreadPoolExecutor(8) as executor:
        credit = CreditRequested(claim_ids=(message.claim_id,))
        credited = list(executor.map(lambda _: len(handle_credit(pool, credit)), range(8)))
    assert sorted(credited) == ([0] * 8 if inline else [0] * 7 + [1])
    assert verify_clean(settings)["counts"]["credits"] == 2


def test_one_number_claiming_from_many_threads_gets_one_package(settings, pool):
    act = make_activity(settings)
    outcomes = _race(pool, settings, [claim(act["slug"], "+8613800138000") for _ in range(32)])
    counts = Counter(o.reason for o in outcomes)
    assert counts == {None: 1, Refusal.ALREADY_RECEIVED: 31}
    verify_clean(settings)


def test_many_claimants_racing_for_the_last_packages(settings, pool):
    act = make_activity(settings, budget=25, codes=100)
    outcomes = _race(pool, settings, [claim(act["slug"]) for _ in range(80)])
    counts = Counter(o.reason for o in outcomes)
    assert counts == {None: 25, Refusal.SOLD_OUT: 55}, "no overselling and no slot left unsold"
    verify_clean(settings)


def test_many_claimants_racing_for_the_last_codes(settings, pool):
    act = make_activity(settings, budget=100, codes=20, templates=2)
    outcomes = _race(pool, settings, [claim(act["slug"]) for _ in range(60)])
    counts = Counter(o.reason for o in outcomes)
    assert counts == {None: 20, Refusal.POOL_EMPTY: 40}
    report = verify_clean(settings)
    assert report["counts"]["codes_bound"] == 40 and report["counts"]["codes_available"] == 0


def _claim_in_process(args: tuple[dict[str, str], str, int]) -> list[str]:
    env, slug, count = args
    from issuance.shared.settings import settings_from

    settings = settings_from(env)
    with database.pool(settings, max_size=4) as pool:
        return [str(handle_claim(pool, settings, claim(slug, "+8613800138000")).reason) for _ in range(count)]


def test_one_number_from_many_processes_gets_one_package(settings: Settings, service_env):
    act = make_activity(settings)
    with multiprocessing.get_context("spawn").Pool(4) as processes:
        results = processes.map(_claim_in_process, [(service_env, act["slug"], 5)] * 4)
    reasons = Counter(r for batch in results for r in batch)
    assert reasons == {"None": 1, "already_received": 19}
    with psycopg.connect(settings.database_url) as conn:
        members = conn.execute("SELECT count(*) FROM members").fetchone()
    assert members == (1,), "one number is one member"
    verify_clean(settings)


def test_a_claim_another_transaction_is_deciding_is_set_aside_not_waited_for(settings, pool):
    """Two processes' batches holding one re-sent claim: the second batch
    decides everything else at once and leaves that claim (None) for a
    transaction after it, where it comes back a duplicate. Waiting for it
    instead made the two processes' flushers take turns."""
    from issuance.shared.db import store
    from issuance.workers import handlers

    act = make_activity(settings)
    # Allocation marks left by earlier tests' pools would send the second
    # batch to the pass that waits for locked codes (meant for a pool's end).
    store._marks.clear()
    shared, others = claim(act["slug"]), [claim(act["slug"]) for _ in range(3)]
    with pool.connection() as first, first.transaction():
        (decided,) = handlers.claims(first, settings, [shared])
        with psycopg.connect(settings.database_url) as second:
            second.execute("SET statement_timeout = '5s'")  # it would wait forever otherwise
            with second.transaction():
                outcomes = handlers.claims_unless_busy(second, settings, [*others, shared])
    assert outcomes[-1] is None
    assert [o.status for o in outcomes[:-1] if o is not None] == ["credited"] * 3
    (again,) = handle_claims(pool, settings, [shared])
    assert (again.duplicate, again.status, decided.duplicate) == (True, "credited", False)
    assert verify_clean(settings)["counts"]["claims"] == 4


def test_batches_racing_over_the_same_claims_decide_each_once(settings, pool):
    """Many batches sharing re-sent claims, decided at once: every claim is
    decided exactly once, the rest of each batch never waits behind it."""
    act = make_activity(settings, budget=400, codes=400)
    claims = [claim(act["slug"]) for _ in range(200)]
    batches = [claims[i : i + 20] + claims[(i + 37) % 200 : (i + 37) % 200 + 10] for i in range(0, 200, 10)]
    with ThreadPoolExecutor(8) as executor:
        decided = executor.map(lambda b: handle_claims(pool, settings, b), batches)
        outcomes = [o for batch in decided for o in batch]
    firsts = Counter(o.claim_id for o in outcomes if not o.duplicate)
    assert set(firsts.values()) == {1} and len(firsts) == 200
    assert {o.status for o in outcomes} == {"credited"}
    assert verify_clean(settings)["counts"]["claims"] == 200
