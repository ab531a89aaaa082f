"""An activity limited to some cities or provinces, against real
PostgreSQL and the real page: a number from elsewhere is refused at once by
the page, with the regions named, and by the workers; and the channel a claim
came through is kept with it."""

from __future__ import annotations

import secrets

import psycopg
from issuance.shared.db import claim_channels
from issuance.shared.domain import Refusal
from issuance.workers.handlers import handle_claim

from tests.conftest import claim
from tests.integration.lifecycle_support import activity_with, one, rows
from tests.integration.web_pipeline import page_client, post_claim


def changzhou() -> str:
    return f"+861391234{secrets.randbelow(10**4):04d}"  # 139-1234: Changzhou, Jiangsu


def beijing() -> str:
    return f"+861380013{secrets.randbelow(10**4):04d}"  # 138-0013: Beijing


def test_a_number_from_outside_the_activitys_regions_is_refused(settings, pool):
    act = activity_with(settings, regions=["Jiangsu", "上海"])
    assert one(settings, "SELECT regions FROM activities WHERE slug = %s", act["slug"]) == ["Jiangsu", "上海"]
    inside = handle_claim(pool, settings, claim(act["slug"], changzhou()))
    outside = handle_claim(pool, settings, claim(act["slug"], beijing()))
    assert inside.status == "credited"
    assert (outside.status, outside.reason) == ("refused", "outside_region")
    assert rows(settings, "SELECT reason FROM claims WHERE status = 'refused'") == [("outside_region",)]

    # The page refuses at once and says which regions the activity is open to.
    with page_client(settings) as client:
        answer = post_claim(client, act["slug"], beijing())
        assert answer.status_code == 200
        assert answer.json() == {
            "status": "refused",
            "reason": "outside_region",
            "message": f"{Refusal.OUTSIDE_REGION.text}: Jiangsu, 上海",
        }
        page = client.get(f"/a/{act['slug']}").text
        assert "该活动仅限以下地区的手机号参与：Jiangsu, 上海" in page


def test_a_claim_keeps_the_channel_it_came_through(settings, pool):
    act = activity_with(settings)
    message = claim(act["slug"], changzhou(), channel="微信群 7")
    from_group = handle_claim(pool, settings, message)
    from_app = handle_claim(pool, settings, claim(act["slug"], changzhou()))
    handle_claim(pool, settings, message)  # delivered again: kept once
    with psycopg.connect(settings.database_url) as conn:
        assert claim_channels.channel_of(conn, from_group.claim_id) == "微信群 7"
        assert claim_channels.channel_of(conn, from_app.claim_id) == "test"  # the activity's own
    assert rows(settings, "SELECT channel FROM claim_channels") == [("微信群 7",)]
