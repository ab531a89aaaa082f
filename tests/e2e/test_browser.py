"""A shopper's visit in a real browser: Debian's Chromium driven by Playwright
against the page on localhost, at a phone's viewport (390x844), with the real
workers, RabbitMQ, PostgreSQL and Redis behind it. Every state is checked for
the seed's words and with axe-core (no serious or critical violation);
screenshots are kept in tests/artifacts/."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from axe_playwright_python.sync_playwright import Axe
from issuance.shared.domain import share_id_for
from issuance.shared.settings import Settings
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import make_activity, verify_clean
from tests.e2e.conftest import wait_for
from tests.integration.web_pipeline import purge, serve

ARTIFACTS = Path(__file__).parents[1] / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PHONE = {"width": 390, "height": 844}
APP_URL = "https://app.example/open"


@pytest.fixture
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: `make browser` installs it"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def phone_page(browser: Browser, locale: str = "zh-CN") -> Page:
    page = browser.new_page(viewport=PHONE, device_scale_factor=1, locale=locale, is_mobile=True)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # Console errors other than the API's refusals (a 422 for a bad number is
    # an answer, not a fault): CSP violations, script errors.
    page.on(
        "console",
        lambda msg: (
            errors.append(msg.text)
            if msg.type == "error" and not msg.text.startswith("Failed to load resource")
            else None
        ),
    )
    page.set_default_timeout(15_000)
    setattr(page, "js_errors", errors)  # noqa: B010 - read back by checked()
    return page


def checked(page: Page, name: str) -> None:
    """A state's screenshot, no horizontal scroll at 390px, no script or CSP
    error, and no serious or critical accessibility violation."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], name
    assert page.locator('meta[name="viewport"]').count() == 1, name
    assert getattr(page, "js_errors") == [], name  # noqa: B009
    violations = [
        (v["id"], v["impact"], [n["target"] for n in v["nodes"]])
        for v in Axe().run(page).response["violations"]
        if v["impact"] in ("serious", "critical")
    ]
    assert violations == [], (name, violations)


def share_opens(settings: Settings, share: str) -> int:
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute("SELECT count(*) FROM share_opens WHERE share_id = %s", (share,)).fetchone()
    return int(row[0]) if row else 0


RULES = (
    "1. 活动期间，输入手机号即可领取礼包，每个手机号限领一次；\n"
    "2. 优惠券将在24小时内存入该手机号对应的账户；\n"
    "3. 如有疑问请联系客服 400-000-0000。"
)


def dress(settings: Settings, slug: str, *, rules: str = RULES, **activity: Any) -> None:
    """The look of a real campaign: copy, rules, brand and a 满50减10 coupon."""
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE activities SET title = %s, copy = %s, rules = %s, brand = %s WHERE slug = %s",
            ("下单分享红包", "好友送你一个购物红包，手慢无！", rules, "Acme 商城", slug),
        )
        conn.execute(
            "UPDATE coupon_templates t SET title = '满50减10', value = 1000, threshold_cents = 5000"
            "  FROM activities a WHERE a.activity_id = t.activity_id AND a.slug = %s",
            (slug,),
        )
        for column, value in activity.items():
            conn.execute(f"UPDATE activities SET {column} = %s WHERE slug = %s", (value, slug))


def claim(page: Page, number: str) -> None:
    page.fill("#phone", number)
    page.click("#claim")


def test_shopper_claims_sees_the_card_and_is_refused_with_the_seeds_words(
    settings: Settings, start_workers: Callable[..., Any], browser: Browser
) -> None:
    purge(settings)
    act = make_activity(settings, templates=1, group="takeout")
    similar = make_activity(settings, group="takeout")
    held = make_activity(settings)
    for slug in (act["slug"], similar["slug"]):
        dress(settings, slug)
    dress(settings, held["slug"], hold_until_registered=True)
    start_workers(processes=1, threads=4)
    share = str(share_id_for("SO-browser-1"))
    with serve(dataclasses.replace(settings, app_url=APP_URL)) as url:
        page = phone_page(browser)
        page.goto(f"{url}/a/{act['slug']}?share={share}")
        expect(page).to_have_title("下单分享红包")
        expect(page.locator("html")).to_have_attribute("lang", "zh-CN")
        expect(page.locator("footer.brand")).to_have_text("Acme 商城")
        package = page.locator("#package .coupon")
        expect(package).to_have_count(1)
        expect(package.locator(".amount")).to_have_text("¥10")
        expect(package.locator(".condition")).to_have_text("满50元可用")
        expect(package.locator(".coupon-title")).to_have_text("满50减10")
        expect(page.get_by_label("手机号")).to_be_visible()
        expect(page.locator(".rules h2")).to_have_text("活动规则")
        checked(page, "page-claim-form")
        message = page.locator("#message")

        claim(page, "12345")
        expect(message).to_have_text("请输入正确的手机号")
        expect(page.locator("#phone")).to_have_attribute("aria-invalid", "true")
        checked(page, "page-bad-number")

        # Keyboard only: type the number and press Enter.
        page.locator("#phone").fill("138 0013 8000")
        page.keyboard.press("Enter")
        result = page.locator("#result")
        expect(result.locator("h2")).to_have_text("领取成功！")
        expect(result.locator("h2")).to_be_focused()
        expect(page.locator("#result-text")).to_have_text("优惠券已存入您的账户", timeout=30_000)
        card = page.locator("#coupons .coupon")
        expect(card).to_have_count(1)
        expect(card.locator(".amount")).to_have_text("¥10")
        expect(card.locator(".condition")).to_have_text("满50元可用")
        expect(card.locator(".coupon-title")).to_have_text("满50减10")
        expect(card.locator(".coupon-expiry")).to_have_text(re.compile(r"^有效期至 \d{4}-\d{2}-\d{2} 23:59$"))
        assert card.locator(".code").inner_text().startswith(act["prefixes"][0])
        use = page.get_by_role("link", name="立即使用")
        expect(use).to_have_attribute("href", APP_URL)
        checked(page, "page-success")

        page.goto(f"{url}/a/{act['slug']}")
        claim(page, "+86 138 0013 8000")
        # Answered at once by the gate, or (if the worker's gate update is
        # still on its way) accepted and then refused by the worker.
        expect(message).to_have_text("您已领取过该礼包", timeout=30_000)
        expect(page.get_by_role("link", name="查看我的优惠券")).to_have_attribute("href", APP_URL)
        checked(page, "page-already-received")

        page.goto(f"{url}/a/{similar['slug']}")
        claim(page, "13800138000")
        expect(message).to_have_text("您已参加过同类活动，请查看账户优惠券", timeout=30_000)
        download = page.get_by_role("link", name="下载APP查看")
        expect(download).to_have_attribute("href", APP_URL)
        checked(page, "page-similar-activity")

        page.goto(f"{url}/a/{held['slug']}")
        claim(page, "13900139000")  # a number not registered on the platform
        expect(page.locator("#result-text")).to_have_text(
            "使用该手机号注册APP后，优惠券将在24小时内到账", timeout=30_000
        )
        expect(page.get_by_role("link", name="立即注册")).to_have_attribute("href", APP_URL)
        checked(page, "page-held-until-registration")
    wait_for(lambda: share_opens(settings, share) == 1, timeout=30, what="the share open to be recorded")
    assert (ARTIFACTS / "page-success.png").stat().st_size > 10_000
    verify_clean(settings)


def test_closed_states_error_pages_and_english(settings: Settings, browser: Browser) -> None:
    """What the page says before, after and instead of a claim, with no
    worker needed: every answer here is the page's own."""
    ended = make_activity(settings, starts_in=timedelta(days=-3), lasts=timedelta(days=1))
    later = make_activity(settings, starts_in=timedelta(days=2))
    offline = make_activity(settings, online=False)
    sold_out = make_activity(settings, budget=0)
    bare = make_activity(settings)
    for act in (ended, later, offline, sold_out):
        dress(settings, act["slug"])
    dress(settings, bare["slug"], rules="")
    with serve(settings) as url:
        page = phone_page(browser)
        for act, name, words in (
            (ended, "page-ended", "活动已结束，您来晚了，下次早点来哦"),
            (later, "page-not-started", "活动尚未开始"),
            (offline, "page-offline", "活动已下线"),
            (sold_out, "page-sold-out", "礼包已被抢光啦"),
        ):
            page.goto(f"{url}/a/{act['slug']}")
            expect(page.locator("#message .closed-text")).to_have_text(words)
            expect(page.locator("#phone")).to_have_count(0)
            checked(page, name)
        page.goto(f"{url}/a/{later['slug']}")
        expect(page.locator(".closed-detail")).to_contain_text("活动将于")

        page.goto(f"{url}/a/{bare['slug']}")
        expect(page.locator(".rules")).to_have_count(0)  # no empty "rules" heading
        # The app's URL is not set: no button leads nowhere.
        claim(page, "12345")
        expect(page.locator("#message")).to_have_text("请输入正确的手机号")
        expect(page.locator("#actions a")).to_have_count(0)

        response = page.goto(f"{url}/a/no-such-activity")
        assert response is not None and response.status == 404
        expect(page.locator("h1")).to_have_text("页面不存在")
        checked(page, "page-not-found")
        response = page.goto(f"{url}/no/such/path")
        assert response is not None and response.status == 404
        expect(page.locator("html")).to_have_attribute("lang", "zh-CN")

        english = phone_page(browser, locale="en-US")
        english.goto(f"{url}/a/{ended['slug']}")
        expect(english.locator("html")).to_have_attribute("lang", "en")
        expect(english.locator("#message .closed-text")).to_have_text(
            "The event has ended! You are late, come earlier next time!"
        )
        english.goto(f"{url}/a/{bare['slug']}")
        claim(english, "12345")
        expect(english.locator("#message")).to_have_text("Please enter a correct mobile number")
        checked(english, "page-english-bad-number")
        english.get_by_role("link", name="中文").click()
        expect(english.locator("html")).to_have_attribute("lang", "zh-CN")
        expect(english.locator("#claim")).to_have_text("立即领取")

        # The page was open when loaded and the event ends before the claim:
        # the API's reason code picks the seed's words.
        page.goto(f"{url}/a/{bare['slug']}")
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            conn.execute("UPDATE activities SET ends_at = now() WHERE slug = %s", (bare["slug"],))
        time.sleep(settings.web_cache_seconds + 0.5)  # the page's activity cache
        claim(page, "13800138000")
        expect(page.locator("#message")).to_have_text("活动已结束，您来晚了，下次早点来哦")
