"""The activity page against the real PostgreSQL, Redis and RabbitMQ: every
refusal of DOMAIN.md, acceptance and status, and the outage answers."""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import jsonschema
import psycopg
import pytest
import redis
from issuance.producers.web.fastgate import FastGate, Limits, accepted_key, budget_key
from issuance.producers.web.openapi import SPEC
from issuance.shared import gate
from issuance.shared.domain import Refusal, phone_digest, share_id_for
from issuance.shared.settings import Settings
from issuance.shared.wire.messages import ShareOpened

from tests.conftest import make_activity
from tests.e2e.conftest import Workers, claim_states, wait_for
from tests.integration.web_pipeline import (
    page_client,
    post_claim,
    purge,
    read_status,
    settle,
    take_messages,
    workers_running,
)

PHONE = "+8613800138000"
ACCEPTED = "accepted: your coupons arrive within 24 hours"


@pytest.fixture(autouse=True)
def _empty_queues(settings: Settings) -> None:
    purge(settings)


@pytest.fixture
def workers(service_env: dict[str, str], settings: Settings, tmp_path: Path) -> Iterator[Workers]:
    with workers_running(service_env, settings, tmp_path / "workers.log") as running:
        yield running


def fresh(settings: Settings, **changes: object) -> Settings:
    """The test's settings without the activity cache, so each read is current."""
    return dataclasses.replace(settings, web_cache_seconds=0, **changes)  # type: ignore[arg-type]


def test_page_renders_the_activity_and_a_share_open_is_published(settings: Settings) -> None:
    act = make_activity(settings)
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE activities SET banner_url = %s, copy = %s, rules = %s, brand = %s WHERE slug = %s",
            ("https://cdn.example/b.png", "Open <now>!", "One per number.", "Acme & Co", act["slug"]),
        )
    share = share_id_for("SO-web-1")
    with page_client(fresh(settings)) as client:
        response = client.get(f"/a/{act['slug']}", params={"share": str(share)})
        assert response.status_code == 200
        html = response.text
        assert f"<title>Activity {act['slug']}</title>" in html
        assert '<img class="banner" src="https://cdn.example/b.png"' in html
        assert "Open &lt;now&gt;!" in html and "One per number." in html and "Acme &amp; Co" in html
        assert 'id="phone"' in html and f'data-share="{share}"' in html
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert client.get("/static/claim.js").status_code == 200
        deadline = time.monotonic() + 10
        opened: list[object] = []
        while not opened and time.monotonic() < deadline:
            opened = take_messages(settings, "shares")
            time.sleep(0.05)
    assert len(opened) == 1
    assert isinstance(opened[0], ShareOpened) and opened[0].share_id == share


def test_page_states_ended_not_started_and_unknown(settings: Settings) -> None:
    ended = make_activity(settings, starts_in=timedelta(days=-3), lasts=timedelta(days=1))
    later = make_activity(settings, starts_in=timedelta(days=2))
    offline = make_activity(settings, online=False)
    with page_client(fresh(settings)) as client:
        # The page speaks Chinese (tests/unit/test_web_page.py); the API's
        # messages stay as they are.
        for act, words, text in (
            (ended, "活动已结束，您来晚了，下次早点来哦", Refusal.ENDED.text),
            (later, "活动尚未开始", Refusal.NOT_STARTED.text),
            (offline, "活动已下线", Refusal.ENDED.text),
        ):
            page = client.get(f"/a/{act['slug']}")
            assert page.status_code == 200 and words in page.text and 'id="phone"' not in page.text
            answer = post_claim(client, act["slug"], PHONE)
            assert answer.status_code == 200
            assert answer.json()["message"] == text
        missing = client.get("/a/no-such-activity")
        assert missing.status_code == 404 and "页面不存在" in missing.text
        answer = post_claim(client, "no-such-activity", PHONE)
        assert answer.status_code == 404 and answer.json()["reason"] == "unknown_activity"
    assert take_messages(settings, "claims") == []


@pytest.mark.parametrize("phone", ["12345", "not a number", "+86 138", "+86 1380013800"])
def test_bad_number_is_refused_at_once(settings: Settings, phone: str) -> None:
    act = make_activity(settings)
    with page_client(fresh(settings)) as client:
        answer = post_claim(client, act["slug"], phone)
    assert answer.status_code == 422
    assert answer.json() == {
        "status": "refused",
        "reason": "bad_phone",
        "message": "please enter a correct mobile number",
    }


def granted_in_gate(settings: Settings, activity: str, phone: str) -> bool:
    digest = phone_digest(phone, settings.phone_key).hex()
    return bool(redis.Redis.from_url(settings.redis_url).sismember(gate.activity_key(activity), digest))


def test_accepted_then_credited_then_already_received(settings: Settings, workers: Workers) -> None:
    act = make_activity(settings, templates=2)
    with page_client(fresh(settings)) as client:
        answer = post_claim(client, act["slug"], "138 0013 8000")  # normalised with the default region
        assert answer.status_code == 202
        body = answer.json()
        assert body["status"] == "accepted" and body["message"] == ACCEPTED
        first = read_status(client, body).json()
        assert first["status"] in ("accepted", "bound", "credited")

        (status,) = settle(client, body)
        assert status["status"] == "credited"
        assert sorted(c["code"][:3] for c in status["coupons"]) == sorted(act["prefixes"])
        jsonschema.validate(status, SPEC["components"]["schemas"]["ClaimStatus"])

        wait_for(lambda: granted_in_gate(settings, act["slug"], PHONE), timeout=10, what="the gate")
        again = post_claim(client, act["slug"], PHONE)
        assert again.status_code == 200
        assert again.json()["message"] == "you have already received this package"
        jsonschema.validate(again.json(), SPEC["components"]["schemas"]["ClaimAnswer"])
    assert claim_states(settings) == {"credited": 1}


def test_worker_refusal_reaches_the_status(settings: Settings, workers: Workers) -> None:
    """When the gate does not know (Redis emptied), the page accepts and the
    worker's recorded reason is what the status reports."""
    act = make_activity(settings)
    with page_client(fresh(settings)) as client:
        settle(client, post_claim(client, act["slug"], PHONE).json())
        wait_for(lambda: granted_in_gate(settings, act["slug"], PHONE), timeout=10, what="the gate")
        redis.Redis.from_url(settings.redis_url).flushdb()
        second = post_claim(client, act["slug"], PHONE)
        assert second.status_code == 202
        (status,) = settle(client, second.json())
    assert status["status"] == "refused" and status["reason"] == "already_received"
    assert status["message"] == "you have already received this package"


def test_similar_activity_is_refused_at_once(settings: Settings, workers: Workers) -> None:
    first = make_activity(settings, group="double-eleven")
    second = make_activity(settings, group="double-eleven")
    with page_client(fresh(settings)) as client:
        settle(client, post_claim(client, first["slug"], PHONE).json())
        wait_for(lambda: granted_in_gate(settings, first["slug"], PHONE), timeout=10, what="the gate")
        answer = post_claim(client, second["slug"], PHONE)
    assert answer.status_code == 200
    assert answer.json()["message"] == "you have taken part in a similar activity, please check your coupons"


def test_budget_counter_answers_all_packages_are_gone(settings: Settings, workers: Workers) -> None:
    act = make_activity(settings, budget=2)
    with page_client(fresh(settings)) as client:
        accepted = [post_claim(client, act["slug"], f"+861380013800{i}") for i in (1, 2)]
        assert [a.status_code for a in accepted] == [202, 202]
        third = post_claim(client, act["slug"], "+8613800138003")
        assert third.status_code == 200 and third.json()["message"] == "all packages are gone"
        settle(client, *(a.json() for a in accepted))
        # A new counter is seeded from PostgreSQL's count of granted packages.
        redis.Redis.from_url(settings.redis_url).flushdb()
        fourth = post_claim(client, act["slug"], "+8613800138004")
        assert fourth.json()["message"] == "all packages are gone"
        page = client.get(f"/a/{act['slug']}")
        assert "礼包已被抢光啦" in page.text and 'id="phone"' not in page.text
    assert claim_states(settings) == {"credited": 2}


def test_empty_code_pool_is_reported_by_the_status(settings: Settings, workers: Workers) -> None:
    act = make_activity(settings, codes=0)
    with page_client(fresh(settings)) as client:
        accepted = post_claim(client, act["slug"], PHONE).json()
        (status,) = settle(client, accepted)
        claim_id = accepted["claim_id"]
    assert status == {
        "claim_id": claim_id,
        "status": "refused",
        "reason": "pool_empty",
        "message": "all packages are gone",
    }


def test_unknown_claim_status_is_404(settings: Settings) -> None:
    with page_client(fresh(settings)) as client:
        assert client.get(f"/api/claims/{uuid.uuid4()}").status_code == 404
        assert client.get("/api/claims/not-a-uuid").status_code == 404


def test_resent_claim_id_is_published_once(settings: Settings) -> None:
    act = make_activity(settings)
    claim_id = str(uuid.uuid4())
    with page_client(fresh(settings)) as client:
        first = post_claim(client, act["slug"], PHONE, claim_id=claim_id)
        second = post_claim(client, act["slug"], PHONE, claim_id=claim_id)
        other = post_claim(client, act["slug"], "+8613900139000", claim_id=claim_id)
    assert first.status_code == second.status_code == 202
    assert first.json()["claim_id"] == second.json()["claim_id"] == claim_id
    assert other.status_code == 409
    assert len(take_messages(settings, "claims")) == 1


def test_rate_limit_per_ip(settings: Settings) -> None:
    act = make_activity(settings)
    with page_client(fresh(settings, web_rate_per_ip=3)) as client:
        codes = [post_claim(client, act["slug"], f"+86138001380{i:02d}").status_code for i in range(5)]
    assert codes == [202, 202, 202, 429, 429]


def test_rate_limit_per_number_and_activity(settings: Settings) -> None:
    act = make_activity(settings)
    other = make_activity(settings)
    with page_client(fresh(settings, web_rate_per_phone=2)) as client:
        codes = [post_claim(client, act["slug"], PHONE).status_code for _ in range(2)]
        limited = post_claim(client, act["slug"], PHONE)
        another_number = post_claim(client, act["slug"], "+8613900139000")
        # Someone posting a victim's number on one activity does not lock the
        # victim out of the others.
        elsewhere = post_claim(client, other["slug"], PHONE)
    assert codes == [202, 202]
    assert limited.status_code == 429 and limited.json()["status"] == "limited"
    assert int(limited.headers["retry-after"]) > 0
    assert another_number.status_code == 202
    assert elsewhere.status_code == 202


def test_rabbitmq_down_answers_busy_and_leaves_nothing_behind(settings: Settings) -> None:
    act = make_activity(settings, budget=5)
    down = fresh(settings, amqp_url="amqp://guest:guest@127.0.0.1:1/%2F")
    r = redis.Redis.from_url(settings.redis_url)
    with page_client(down) as client:
        answer = post_claim(client, act["slug"], PHONE)
        assert answer.status_code == 503
        assert answer.json() == {"status": "busy", "message": "busy, try again"}
        claim_id = uuid.uuid4()
        assert post_claim(client, act["slug"], PHONE, claim_id=str(claim_id)).status_code == 503
    assert int(r.get(budget_key(act["slug"])) or 0) == 5  # the package was given back
    assert not r.exists(accepted_key(claim_id))
    with page_client(fresh(settings)) as client:  # and it works again once RabbitMQ is back
        assert post_claim(client, act["slug"], PHONE, claim_id=str(claim_id)).status_code == 202
    assert [str(m.claim_id) for m in take_messages(settings, "claims")] == [str(claim_id)]  # type: ignore[attr-defined]


def test_redis_down_still_accepts(settings: Settings) -> None:
    act = make_activity(settings)
    with page_client(fresh(settings, redis_url="redis://127.0.0.1:1/0")) as client:
        started = time.monotonic()
        answers = [post_claim(client, act["slug"], PHONE) for _ in range(3)]
        elapsed = time.monotonic() - started
        status = read_status(client, answers[0].json())
    assert [a.status_code for a in answers] == [202, 202, 202]
    assert elapsed < 3
    assert status.json()["status"] == "accepted"
    assert len(take_messages(settings, "claims")) == 3  # the workers decide


def test_request_hygiene(settings: Settings) -> None:
    act = make_activity(settings)
    with page_client(fresh(settings)) as client:
        url = "/api/claims"
        body = {"activity": act["slug"], "phone": PHONE}
        cross = client.post(url, json=body, headers={"origin": "https://evil.example"})
        assert cross.status_code == 403
        cross_site = client.post(url, json=body, headers={"origin": "", "sec-fetch-site": "cross-site"})
        assert cross_site.status_code == 403
        form = client.post(url, data=body)  # a classic form post
        assert form.status_code == 415
        assert client.post(url, content=b"{", headers={"content-type": "application/json"}).status_code == 400
        huge = client.post(url, json={**body, "phone": "1" * 5000})
        assert huge.status_code == 413
        for bad in (
            {**body, "phone": 8613800138000},
            {**body, "extra": 1},
            {"phone": PHONE},
            {**body, "share_id": "nope"},
            [body],
        ):
            answer = client.post(url, json=bad)
            assert answer.status_code == 422, bad
            assert answer.json()["status"] == "invalid"
        assert client.get(f"/api/claims/{uuid.uuid4()}").headers["cache-control"] == "no-store"
    assert take_messages(settings, "claims") == []


def test_trusted_origin_may_post(settings: Settings) -> None:
    act = make_activity(settings)
    trusted = fresh(settings, web_trusted_origins="https://m.shop.example, https://other.example")
    with page_client(trusted) as client:
        body = {"activity": act["slug"], "phone": PHONE}
        answer = client.post("/api/claims", json=body, headers={"origin": "https://m.shop.example"})
    assert answer.status_code == 202


def test_no_number_in_clear_in_any_log_line(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    act = make_activity(settings)
    caplog.set_level(logging.DEBUG)
    with page_client(fresh(settings, web_rate_per_phone=1)) as client:
        post_claim(client, act["slug"], PHONE)
        post_claim(client, act["slug"], PHONE)  # limited, logged
    with page_client(fresh(settings, amqp_url="amqp://guest:guest@127.0.0.1:1/%2F")) as client:
        post_claim(client, act["slug"], "+8613900139000")  # busy, logged
    lines = [record.getMessage() for record in caplog.records]
    assert any("+86138******00" in line for line in lines)
    for line in lines:
        assert "13800138000" not in line and "13900139000" not in line


def test_openapi_describes_the_endpoints(settings: Settings) -> None:
    with page_client(fresh(settings)) as client:
        spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.1")
    assert set(spec["paths"]) == {"/api/claims", "/api/claims/{claim_id}"}
    form = spec["components"]["schemas"]["ClaimForm"]
    jsonschema.validate({"activity": "a-1", "phone": PHONE, "share_id": None}, form)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"activity": "a-1", "phone": 1}, form)


def test_gate_survives_a_redis_restart_that_lost_its_scripts(settings: Settings) -> None:
    act = make_activity(settings)
    r = redis.Redis.from_url(settings.redis_url)
    with page_client(fresh(settings, web_rate_per_ip=3)) as client:
        codes = [post_claim(client, act["slug"], f"+86138001380{i:02d}").status_code for i in range(2)]
        r.script_flush()
        codes += [post_claim(client, act["slug"], f"+86138001381{i:02d}").status_code for i in range(2)]
    assert codes == [202, 202, 202, 429]  # still counted after the script was loaded again


def test_give_back_never_creates_a_counter_without_expiry(settings: Settings) -> None:
    """A package given back after the counter expired must not leave a
    counter of 1 behind that would refuse every later claim as sold out."""
    import asyncio

    r = redis.Redis.from_url(settings.redis_url)

    async def give_back() -> None:
        fast = FastGate(settings.redis_url, limits=Limits(10, 10, 10, 10, 60))
        await fast.give_back("expired-activity")
        r.set(budget_key("live-activity"), 4, ex=5)
        await fast.give_back("live-activity")
        await fast.close()

    asyncio.run(give_back())
    assert not r.exists(budget_key("expired-activity"))
    assert int(r.get(budget_key("live-activity")) or 0) == 5
    assert 0 < r.ttl(budget_key("live-activity")) <= 5


def test_the_page_serves_its_request_metrics(settings: Settings) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    act = make_activity(settings)
    with page_client(fresh(settings)) as client:
        before = samples(client.get("/metrics").text)
        assert post_claim(client, act["slug"], PHONE).status_code == 202
        assert post_claim(client, act["slug"], "12345").status_code == 422
        scraped = client.get("/metrics")
    assert scraped.status_code == 200
    after = samples(scraped.text)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("issuance_web_requests_total", route="/api/claims", status="202") == 1
    assert grew("issuance_web_requests_total", route="/api/claims", status="422") == 1
    assert grew("issuance_web_request_seconds_count", route="/api/claims") == 2


def _gate_verdicts(
    settings: Settings, limits: Limits, attempts: list[tuple[str, uuid.UUID | None]]
) -> list[str]:
    """What the gate answers to claims for fresh numbers from these (address, share) pairs."""
    import asyncio

    async def run() -> list[str]:
        fast = FastGate(settings.redis_url, limits=limits)
        try:
            return [
                (
                    await fast.check_claim(
                        client_ip=ip,
                        activity="gate-limits",
                        group="",
                        digest=uuid.uuid4().bytes,
                        claim_id=uuid.uuid4(),
                        remaining=1000,
                        share_id=share,
                    )
                ).value
                for ip, share in attempts
            ]
        finally:
            await fast.close()

    return asyncio.run(run())


def test_gate_limits_per_network_of_v4_and_v6_addresses(settings: Settings) -> None:
    limits = Limits(per_ip=100, per_network=3, per_phone=10, per_share=0, window_seconds=60)
    v4 = [(f"203.0.113.{i}", None) for i in range(1, 6)] + [("203.0.114.1", None)]
    v6 = [(f"2001:db8:0:1::{i}", None) for i in range(1, 6)] + [("2001:db8:0:2::1", None)]
    assert _gate_verdicts(settings, limits, v4) == ["ok"] * 3 + ["rate_network"] * 2 + ["ok"]
    assert _gate_verdicts(settings, limits, v6) == ["ok"] * 3 + ["rate_network"] * 2 + ["ok"]


def test_gate_limits_per_share(settings: Settings) -> None:
    limits = Limits(per_ip=100, per_network=100, per_phone=10, per_share=2, window_seconds=60)
    abused, other = uuid.uuid4(), uuid.uuid4()
    attempts = [(f"198.51.{i}.1", abused) for i in range(4)] + [("198.51.9.1", other), ("198.51.10.1", None)]
    assert _gate_verdicts(settings, limits, attempts) == ["ok", "ok", "rate_share", "rate_share", "ok", "ok"]


def test_redis_down_still_limits_in_process(settings: Settings) -> None:
    """Redis down no longer means no limits: a bot from one address gets the
    same per-address limit from the page's own token buckets."""
    act = make_activity(settings)
    down = fresh(settings, redis_url="redis://127.0.0.1:1/0", web_rate_per_ip=3)
    with page_client(down) as client:
        codes = [post_claim(client, act["slug"], f"+86138001380{i:02d}").status_code for i in range(6)]
    assert codes == [202, 202, 202, 429, 429, 429]
    assert len(take_messages(settings, "claims")) == 3


def test_numbers_of_other_regions_are_refused_with_a_reason(settings: Settings) -> None:
    act = make_activity(settings)
    with page_client(fresh(settings, web_allowed_regions="CN")) as client:
        andorra = post_claim(client, act["slug"], "+376312345")
        china = post_claim(client, act["slug"], PHONE)
    assert andorra.status_code == 422
    assert andorra.json() == {
        "status": "refused",
        "reason": "region",
        "message": "this activity is open only to mobile numbers of CN",
    }
    jsonschema.validate(andorra.json(), SPEC["components"]["schemas"]["ClaimAnswer"])
    assert china.status_code == 202
    assert len(take_messages(settings, "claims")) == 1


def test_challenge_without_a_provider_refuses_and_says_so(settings: Settings) -> None:
    act = make_activity(settings)
    with page_client(fresh(settings, web_challenge="always")) as client:
        answer = post_claim(client, act["slug"], PHONE, challenge="123456")
        bare = post_claim(client, act["slug"], "+8613900139000")
    assert answer.status_code == 503
    assert "no challenge provider is configured" in answer.json()["message"]
    assert bare.status_code == 403 and bare.json()["status"] == "challenge"
    assert take_messages(settings, "claims") == []


def test_challenge_above_a_rate_starts_once_the_rate_is_passed(settings: Settings) -> None:
    act = make_activity(settings)
    with page_client(fresh(settings, web_challenge="above:2")) as client:
        codes = [post_claim(client, act["slug"], f"+86138001380{i:02d}").status_code for i in range(4)]
    assert codes == [202, 202, 403, 403]


def test_status_reads_only_for_the_claimant(settings: Settings) -> None:
    act = make_activity(settings)
    with page_client(fresh(settings)) as client:
        mine = post_claim(client, act["slug"], PHONE).json()
        theirs = post_claim(client, act["slug"], "+8613900139000").json()
        jsonschema.validate(mine, SPEC["components"]["schemas"]["ClaimAnswer"])
        url = f"/api/claims/{mine['claim_id']}"
        stranger = client.get(url)
        wrong = client.get(url, params={"token": theirs["status_token"]})
        garbage = client.get(url, params={"token": "é" * 64})
        by_header = client.get(url, headers={"x-claim-token": mine["status_token"]})
        by_query = read_status(client, mine)
    unknown = {"status": "unknown", "message": "no such claim"}
    assert stranger.status_code == wrong.status_code == garbage.status_code == 404
    assert stranger.json() == wrong.json() == garbage.json() == unknown
    assert by_header.status_code == by_query.status_code == 200
    assert by_header.json()["status"] == "accepted"


def test_status_reads_are_throttled_per_address(settings: Settings) -> None:
    act = make_activity(settings)
    with page_client(fresh(settings, web_status_rate_per_ip=3)) as client:
        accepted = post_claim(client, act["slug"], PHONE).json()
        codes = [read_status(client, accepted).status_code for _ in range(3)]
        guesses = client.get(f"/api/claims/{uuid.uuid4()}", params={"token": "0" * 64})
    assert codes == [200, 200, 200]
    assert guesses.status_code == 429 and int(guesses.headers["retry-after"]) > 0


def test_share_opens_from_one_address_stop_counting(settings: Settings) -> None:
    """A script opening made-up shares does not inflate the funnel."""
    act = make_activity(settings)
    with page_client(fresh(settings, web_share_opens_per_ip=2)) as client:
        pages = [client.get(f"/a/{act['slug']}", params={"share": str(uuid.uuid4())}) for _ in range(5)]
        assert [p.status_code for p in pages] == [200] * 5
        opened: list[object] = []
        deadline = time.monotonic() + 5
        while len(opened) < 2 and time.monotonic() < deadline:
            opened += take_messages(settings, "shares")
            time.sleep(0.05)
        time.sleep(0.5)
        opened += take_messages(settings, "shares")
    assert len(opened) == 2
