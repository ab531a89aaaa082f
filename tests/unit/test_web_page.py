"""The activity page's pure parts: the claim form's strict types, the page
states, languages and escaping, the coupon cards, the error pages, the
cross-site check and the OpenAPI document."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema
import pytest
from issuance.producers.web.app import ClaimForm, InvalidForm
from issuance.producers.web.i18n import CHINESE, ENGLISH, Texts, catalogue, choose_language
from issuance.producers.web.openapi import SPEC
from issuance.producers.web.page import coupon_face, page_state, render_error, render_page, script_texts
from issuance.producers.web.queries import ActivityPage, CouponFace
from issuance.producers.web.security import own_hosts, parse_origins, same_site
from issuance.shared.domain import ActivityRules
from starlette.requests import Request

NOW = datetime(2026, 11, 11, 12, 0, tzinfo=UTC)


def activity(**changes: Any) -> ActivityPage:
    values: dict[str, Any] = {
        "slug": "double-eleven",
        "title": "Double <11>",
        "banner_url": "https://cdn.example/banner.png",
        "copy": "Red envelopes & more",
        "rules_text": "One per number",
        "brand": "Acme",
        "rules": ActivityRules(
            online=True, starts_at=NOW - timedelta(days=1), ends_at=NOW + timedelta(days=1)
        ),
        "timezone": "Asia/Shanghai",
        "exclusivity_group": "solo:double-eleven",
        "budget": 10,
        "remaining": 10,
        "templates": (CouponFace(title="满50减10", kind="amount_off", value=1000, threshold_cents=5000),),
        "validity_days": 7,
    }
    values.update(changes)
    return ActivityPage(**values)


def test_claim_form_takes_exactly_the_documented_fields() -> None:
    claim_id = str(uuid.uuid4())
    form = ClaimForm.parse({"activity": "a-1", "phone": "+8613800138000", "claim_id": claim_id})
    assert form.claim_id == uuid.UUID(claim_id) and form.share_id is None
    jsonschema.validate(
        {"activity": "a-1", "phone": "+8613800138000", "claim_id": claim_id},
        SPEC["components"]["schemas"]["ClaimForm"],
    )


@pytest.mark.parametrize(
    "data",
    [
        [],
        "text",
        {"phone": "+8613800138000"},
        {"activity": "A B", "phone": "+8613800138000"},
        {"activity": "a-1", "phone": 8613800138000},
        {"activity": "a-1", "phone": "1" * 33},
        {"activity": "a-1", "phone": "+8613800138000", "share_id": 5},
        {"activity": "a-1", "phone": "+8613800138000", "claim_id": "x" * 36},
        {"activity": "a-1", "phone": "+8613800138000", "member_id": 1},
    ],
)
def test_claim_form_refuses_anything_else(data: Any) -> None:
    with pytest.raises(InvalidForm):
        ClaimForm.parse(data)
    if isinstance(data, dict) and "activity" in data and isinstance(data.get("phone"), str):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(
                data, SPEC["components"]["schemas"]["ClaimForm"], format_checker=jsonschema.FormatChecker()
            )


def test_page_states() -> None:
    assert page_state(activity(), NOW) == "open"
    assert page_state(activity(remaining=0), NOW) == "sold_out"
    assert page_state(activity(), NOW + timedelta(days=2)) == "ended"
    assert page_state(activity(), NOW - timedelta(days=2)) == "not_started"
    offline = activity(rules=ActivityRules(online=False, starts_at=NOW, ends_at=NOW + timedelta(days=1)))
    assert page_state(offline, NOW) == "offline"


def test_page_escapes_operator_text_and_refuses_script_banners() -> None:
    html = render_page(activity(banner_url="javascript:alert(1)"), share="", now=NOW)
    assert "<title>Double &lt;11&gt;</title>" in html
    assert "Red envelopes &amp; more" in html
    assert "javascript:" not in html
    later = render_page(activity(), share="", now=NOW - timedelta(days=2))
    assert "活动尚未开始" in later and "活动将于 2026-11-10 20:00 开始" in later
    for url in ("http://cdn.example/b.png", "data:image/png;base64,AAAA", "//evil.example/b.png"):
        assert 'class="banner"' not in render_page(activity(banner_url=url), share="", now=NOW)
    own = render_page(activity(banner_url="/static/b.png"), share="", now=NOW)
    assert '<img class="banner" src="/static/b.png" alt="">' in own


@pytest.mark.parametrize(
    ("state", "at", "changes", "words"),
    [
        ("ended", NOW + timedelta(days=2), {}, "活动已结束，您来晚了，下次早点来哦"),
        ("not_started", NOW - timedelta(days=2), {}, "活动尚未开始"),
        ("sold_out", NOW, {"remaining": 0}, "礼包已被抢光啦"),
        (
            "offline",
            NOW,
            {"rules": ActivityRules(online=False, starts_at=NOW, ends_at=NOW + timedelta(days=1))},
            "活动已下线",
        ),
    ],
)
def test_closed_pages_speak_the_seeds_words(state: str, at: datetime, changes: Any, words: str) -> None:
    html = render_page(activity(**changes), share="", now=at)
    assert '<html lang="zh-CN">' in html
    assert f'data-state="{state}"' in html and words in html
    assert 'id="phone"' not in html and "claim.js" not in html


def test_the_open_page_in_chinese_and_in_english() -> None:
    chinese = render_page(activity(), share="", now=NOW)
    assert '<html lang="zh-CN">' in chinese
    assert '<label for="phone">手机号</label>' in chinese and ">立即领取</button>" in chinese
    assert '<span class="amount">¥10</span><span class="condition">满50元可用</span>' in chinese
    assert "满50减10" in chinese and "领取后7天内有效" in chinese
    assert '<h2 id="rules-heading">活动规则</h2>' in chinese
    assert 'href="?lang=en" lang="en" hreflang="en">English</a>' in chinese
    english = render_page(activity(), share="", now=NOW, texts=Texts(ENGLISH))
    assert '<html lang="en">' in english and ">Claim now</button>" in english
    assert "Valid for 7 days after claiming" in english and "Spend ¥50 to use" in english


def test_rules_are_shown_only_when_there_are_some() -> None:
    assert "rules-heading" not in render_page(activity(rules_text="  \n"), share="", now=NOW)


def test_app_url_is_offered_to_the_script_only_when_it_is_a_safe_link() -> None:
    page = render_page(activity(), share="", now=NOW, app_url="https://app.example/open")
    assert 'data-app-url="https://app.example/open"' in page
    assert 'data-app-url=""' in render_page(activity(), share="", now=NOW, app_url="javascript:alert(1)")


@pytest.mark.parametrize(
    ("coupon", "chinese", "english"),
    [
        (
            CouponFace(title="", kind="amount_off", value=1000, threshold_cents=5000),
            ("¥10", "满50元可用", "满50减10"),
            ("¥10", "Spend ¥50 to use", "Spend ¥50, save ¥10"),
        ),
        (
            CouponFace(title="", kind="amount_off", value=990, threshold_cents=0),
            ("¥9.9", "无门槛", "优惠券"),
            ("¥9.9", "No minimum spend", "Coupon"),
        ),
        (
            CouponFace(title="饮品券", kind="discount_rate", value=1500, threshold_cents=0),
            ("8.5折", "无门槛", "饮品券"),
            ("15% off", "No minimum spend", "饮品券"),
        ),
        (
            CouponFace(title="", kind="gift", value=0, threshold_cents=0),
            ("礼品券", "", "礼品券"),
            ("Gift", "", "Gift"),
        ),
    ],
)
def test_coupon_faces(coupon: CouponFace, chinese: tuple[str, ...], english: tuple[str, ...]) -> None:
    for language, expected in ((CHINESE, chinese), (ENGLISH, english)):
        face = coupon_face(coupon, Texts(language))
        assert (face.value, face.condition, face.title) == expected


@pytest.mark.parametrize(
    ("requested", "accept", "language"),
    [
        (None, None, CHINESE),
        (None, "en-US,en;q=0.9", ENGLISH),
        (None, "fr-FR, en;q=0.5, zh;q=0.4", ENGLISH),
        (None, "en;q=0, zh-TW", CHINESE),
        (None, "de, *", CHINESE),
        ("en", "zh-CN", ENGLISH),
        ("zh-CN", "en", CHINESE),
        ("klingon", "en", ENGLISH),
        (None, "en;q=bad, zh", CHINESE),
    ],
)
def test_language_choice(requested: str | None, accept: str | None, language: str) -> None:
    assert choose_language(requested, accept) == language


class Recording(Texts):
    """Texts that remember every msgid asked for."""

    asked: set[str] = set()

    def __call__(self, msgid: str, **values: object) -> str:
        self.asked.add(msgid)
        return super().__call__(msgid, **values)


def test_every_sentence_of_the_page_has_a_chinese_translation() -> None:
    texts = Recording(CHINESE)
    script_texts(texts, 24)
    for at, changes in (
        (NOW, {}),
        (NOW, {"remaining": 0}),
        (NOW - timedelta(days=2), {}),
        (NOW + timedelta(days=2), {"validity_days": None, "valid_until": NOW}),
        (NOW, {"rules": ActivityRules(online=False, starts_at=NOW, ends_at=NOW)}),
    ):
        render_page(activity(**changes), share="", now=at, texts=texts)
    for template in (
        CouponFace(title="", kind=kind, value=1500, threshold_cents=threshold)
        for kind in ("amount_off", "discount_rate", "gift")
        for threshold in (0, 5000)
    ):
        coupon_face(template, texts)
    render_error(404, texts)
    render_error(500, texts)
    missing = Recording.asked - set(catalogue(CHINESE))
    assert len(Recording.asked) > 40 and missing == set()


def test_the_script_texts_cannot_close_their_script_element() -> None:
    html = render_page(activity(), share="", now=NOW)
    block = html.split('<script type="application/json" id="texts">', 1)[1].split("</script>", 1)[0]
    assert "<" not in block and "&" not in block
    assert "您已参加过同类活动，请查看账户优惠券" in block and "下载APP查看" in block


@pytest.mark.parametrize("status_code", [404, 500, 503])
def test_error_pages_fit_a_phone(status_code: int) -> None:
    html = render_error(status_code)
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in html
    assert '<html lang="zh-CN">' in html
    assert ("页面不存在" in html) == (status_code == 404)
    assert 'lang="en"' in render_error(status_code, Texts(ENGLISH))


def test_the_status_answer_schema_describes_the_coupon_cards() -> None:
    schema = SPEC["components"]["schemas"]["ClaimStatus"]
    coupon = {
        "code": "BZ3ABCDEFGHJ",
        "expires_at": "2026-12-08T00:00:00+08:00",
        "title": "满50减10",
        "kind": "amount_off",
        "value": 1000,
        "threshold_cents": 5000,
    }
    answer = {"claim_id": str(uuid.uuid4()), "status": "credited", "message": "m", "coupons": [coupon]}
    jsonschema.validate(answer, schema, format_checker=jsonschema.FormatChecker())
    jsonschema.validate({"status": "bound", "message": "m", "held": True}, schema)
    for field in ("title", "kind", "value", "threshold_cents"):
        partial = {k: v for k, v in coupon.items() if k != field}
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**answer, "coupons": [partial]}, schema)


def request(headers: dict[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    scope = {"type": "http", "method": "POST", "scheme": "https", "path": "/api/claims", "headers": raw}
    return Request(scope)


def test_same_site_check() -> None:
    trusted = parse_origins("https://partner.example, not-an-origin")
    assert trusted == frozenset({"https://partner.example"})
    hosts = own_hosts("https://m.shop.example/a", trusted)
    host = {"host": "m.shop.example"}
    assert same_site(request({**host, "origin": "https://m.shop.example"}), trusted, hosts)
    assert same_site(request({**host, "origin": "https://partner.example"}), trusted, hosts)
    assert not same_site(request({**host, "origin": "https://evil.example"}), trusted, hosts)
    assert not same_site(request({**host, "origin": "http://m.shop.example"}), trusted, hosts)
    assert not same_site(request({**host, "sec-fetch-site": "cross-site"}), trusted, hosts)
    assert same_site(request({**host, "sec-fetch-site": "same-origin"}), trusted, hosts)
    assert same_site(request(host), trusted, hosts)  # not a browser: no forgery possible
    local = {"host": "127.0.0.1:8123", "origin": "https://127.0.0.1:8123"}
    assert same_site(request(local), trusted, hosts)


def test_dns_rebinding_cannot_pass_for_the_page() -> None:
    """A hostile name that resolves to the page: its Origin and Host agree,
    but the host is not one of the page's names."""
    hosts = own_hosts("https://m.shop.example/a", frozenset())
    rebound = {"host": "evil.example", "origin": "https://evil.example"}
    assert not same_site(request(rebound), frozenset(), hosts)
    with_port = {"host": "evil.example:8000", "origin": "https://evil.example:8000"}
    assert not same_site(request(with_port), frozenset(), hosts)
