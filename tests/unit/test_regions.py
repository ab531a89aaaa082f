"""Cities and provinces: a mobile number's place by its prefix, offline
(phonenumbers' geocoder), and an activity limited to some places refusing a
number from elsewhere with a reason the page can show; and the channel a
claim came through, on the wire."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
import yaml
from issuance.producers.web.i18n import Texts
from issuance.producers.web.page import script_texts
from issuance.shared.backoffice import catalog
from issuance.shared.domain import Refusal, TemplateRef
from issuance.shared.domain.claims import (
    ActivityRules,
    ActivityTerms,
    ClaimRequest,
    Refused,
    Stock,
    decide_claims,
)
from issuance.shared.domain.regions import outside, places_of
from issuance.shared.errors import InvalidMessage, OperatorError
from issuance.shared.wire.messages import ClaimRequested

NOW = datetime(2026, 11, 30, 12, tzinfo=UTC)
CHANGZHOU = "+8613912345678"  # 139-1234: Changzhou, Jiangsu
BEIJING = "+8613800138000"  # 138-0013: Beijing


def test_the_geocoder_knows_chinese_mobile_prefixes_offline():
    assert {"changzhou", "jiangsu", "江苏", "江苏省", "常州", "常州市"} <= places_of(CHANGZHOU)
    assert {"beijing", "北京", "北京市"} <= places_of(BEIJING)


@pytest.mark.parametrize(
    ("regions", "number", "refused"),
    [
        ((), BEIJING, False),
        (("Jiangsu",), CHANGZHOU, False),
        (("JIANGSU",), CHANGZHOU, False),
        (("江苏省",), CHANGZHOU, False),
        (("常州",), CHANGZHOU, False),
        (("Shanghai", "Changzhou"), CHANGZHOU, False),
        (("Jiangsu",), BEIJING, True),
        (("上海",), BEIJING, True),
    ],
)
def test_a_number_is_in_an_activitys_regions_by_city_or_province(regions, number, refused):
    assert outside(regions, number) is refused


def terms(regions: tuple[str, ...], *, online: bool = True) -> ActivityTerms:
    return ActivityTerms(
        activity_id=1,
        slug="spring",
        rules=ActivityRules(
            online=online, starts_at=NOW - timedelta(days=1), ends_at=NOW + timedelta(days=1)
        ),
        timezone="Asia/Shanghai",
        exclusivity_group="solo:spring",
        validity_days=7,
        valid_until=None,
        hold_until_registered=False,
        templates=(TemplateRef(template_id=1, new_user_only=False),),
        regions=regions,
    )


def decide(activity: ActivityTerms, phone: str | None):
    request = ClaimRequest(
        claim_id=uuid.uuid4(),
        activity=activity,
        requested_at=NOW,
        phone=phone,
        member_id=1 if phone else None,
    )
    stock = Stock(slots={1: [1]}, codes={1: ["AAA0000001"]})
    (decision,) = decide_claims([request], holdings={}, stock=stock, now=NOW, credit_inline=True)
    return decision


def test_a_claim_from_outside_the_regions_is_refused_with_its_reason():
    assert decide(terms(("Jiangsu",)), BEIJING) == Refused(Refusal.OUTSIDE_REGION)
    assert not isinstance(decide(terms(("Jiangsu",)), CHANGZHOU), Refused)
    assert not isinstance(decide(terms(()), BEIJING), Refused)
    # The earlier refusals come first: ended, then a bad number.
    assert decide(terms(("Jiangsu",), online=False), BEIJING) == Refused(Refusal.ENDED)
    assert decide(terms(("Jiangsu",)), None) == Refused(Refusal.BAD_PHONE)


def test_the_page_names_the_regions_when_it_refuses_a_number():
    chinese = script_texts(Texts("zh-CN"), 24, ("江苏", "上海"))
    assert chinese["reason.outside_region"] == "该活动仅限以下地区的手机号参与：江苏, 上海"
    english = script_texts(Texts("en"), 24, ("Jiangsu",))
    assert english["reason.outside_region"] == "This activity is only for mobile numbers from: Jiangsu"
    assert "reason.outside_region" in script_texts(Texts("en"), 24)


def activity(**changes):
    values = {
        "slug": "spring",
        "title": "Spring",
        "channel": "app",
        "starts_at": "2026-12-01T00:00:00+08:00",
        "ends_at": "2026-12-31T00:00:00+08:00",
        "budget": 10,
        "templates": [{"prefix": "SPR", "kind": "gift", "value": 300}],
    }
    values.update(changes)
    return values


def test_regions_are_a_list_of_names_checked_when_the_activity_is_created():
    spec = catalog.ActivitySpec.from_mapping(activity(regions=["Jiangsu", " 上海 ", "Jiangsu"]))
    spec.check()
    assert spec.regions == ("Jiangsu", "上海")
    text = catalog.activity_file_text(spec)
    assert "regions:\n- Jiangsu\n- 上海\n" in text
    assert catalog.ActivitySpec.from_mapping(yaml.safe_load(text)) == spec  # read back unchanged
    assert "regions" not in catalog.activity_file_text(catalog.ActivitySpec.from_mapping(activity()))
    for bad, says in (
        ("Jiangsu", "regions must be a list of city or province names, got 'Jiangsu'"),
        ([1], "regions must be a list of city or province names"),
        (["x" * 65], "regions are at most 100 city or province names of 1 to 64 characters"),
    ):
        with pytest.raises(OperatorError, match=says):
            catalog.ActivitySpec.from_mapping(activity(regions=bad)).check()


def test_a_claim_may_name_the_channel_it_came_through():
    base = {
        "v": 1,
        "claim_id": str(uuid.uuid4()),
        "activity": "spring",
        "phone": BEIJING,
        "requested_at": "2026-11-30T12:00:00Z",
    }
    assert ClaimRequested.from_payload({**base, "channel": "微信群 7"}).channel == "微信群 7"
    assert ClaimRequested.from_payload(base).channel is None
    for bad in ("", "x" * 65, "tab\there", 7):
        with pytest.raises(InvalidMessage):
            ClaimRequested.from_payload({**base, "channel": bad})
