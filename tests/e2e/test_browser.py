"""A member's visit in a real browser: Debian's Chromium driven by Playwright
against the page on localhost, with the real workers, RabbitMQ, PostgreSQL
and Redis behind it. Screenshots are kept in tests/artifacts/."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from issuance.shared.domain import share_id_for
from issuance.shared.settings import Settings
from playwright.sync_api import Browser, expect, sync_playwright

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


@pytest.fixture
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: `make browser` installs it"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def share_opens(settings: Settings, share: str) -> int:
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute("SELECT count(*) FROM share_opens WHERE share_id = %s", (share,)).fetchone()
    return int(row[0]) if row else 0


def test_member_claims_from_a_share_link(
    settings: Settings, start_workers: Callable[..., Any], browser: Browser
) -> None:
    purge(settings)
    act = make_activity(settings, templates=2)
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE activities SET copy = %s, rules = %s, brand = %s WHERE slug = %s",
            ("Open the red envelope!", "One package per mobile number.", "Acme Mall", act["slug"]),
        )
    start_workers(processes=1, threads=4)
    share = str(share_id_for("SO-browser-1"))
    ARTIFACTS.mkdir(exist_ok=True)
    with serve(settings) as url:
        page = browser.new_page(viewport={"width": 414, "height": 860})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"{url}/a/{act['slug']}?share={share}")
        expect(page).to_have_title(f"Activity {act['slug']}")
        expect(page.locator(".brand")).to_have_text("Acme Mall")
        message = page.locator("#message")

        page.fill("#phone", "12345")
        page.click("#claim")
        expect(message).to_have_text("please enter a correct mobile number")

        page.fill("#phone", "138 0013 8000")
        page.click("#claim")
        expect(message).to_have_text("accepted: your coupons arrive within 24 hours")
        expect(message).to_have_text("your coupons are in your wallet", timeout=30_000)
        coupons = page.locator(".coupon")
        expect(coupons).to_have_count(2)
        codes = coupons.all_inner_texts()
        assert sorted(code[:3] for code in codes) == sorted(act["prefixes"])
        page.screenshot(path=str(ARTIFACTS / "browser-credited.png"), full_page=True)

        page.fill("#phone", "+86 138 0013 8000")
        page.click("#claim")
        # Answered at once by the gate, or (if the worker's gate update is
        # still on its way) accepted and then refused by the worker.
        expect(message).to_have_text("you have already received this package", timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "browser-already-received.png"), full_page=True)
        assert errors == []
    wait_for(lambda: share_opens(settings, share) == 1, timeout=30, what="the share open to be recorded")
    assert (ARTIFACTS / "browser-credited.png").stat().st_size > 10_000
    verify_clean(settings)
