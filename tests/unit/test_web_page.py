"""The activity page's pure parts: the claim form's strict types, the page
states and escaping, the cross-site check and the OpenAPI document."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema
import pytest
from issuance.producers.web.app import ClaimForm, InvalidForm
from issuance.producers.web.openapi import SPEC
from issuance.producers.web.page import page_state, render_page
from issuance.producers.web.queries import ActivityPage
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
    assert page_state(offline, NOW) == "ended"


def test_page_escapes_operator_text_and_refuses_script_banners() -> None:
    html = render_page(activity(banner_url="javascript:alert(1)"), share="", now=NOW)
    assert "<title>Double &lt;11&gt;</title>" in html
    assert "Red envelopes &amp; more" in html
    assert "javascript:" not in html
    later = render_page(activity(), share="", now=NOW - timedelta(days=2))
    assert "this activity has not started yet: it starts at 2026-11-10 20:00" in later


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
