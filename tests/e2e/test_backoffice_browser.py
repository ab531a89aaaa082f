"""An operator's day in the back office, in a real browser: Debian's
Chromium driven by Playwright against the back office under uvicorn on the
real PostgreSQL. The operator signs in, creates a channel and an activity
(after a refused first try), generates and exports a batch of codes, edits
the banner, and reads the campaign report. axe-core checks every main page
for serious or critical accessibility violations. Screenshots are kept in
tests/artifacts/."""

from __future__ import annotations

import csv
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from axe_playwright_python.sync_playwright import Axe
from issuance.shared.wire.messages import utcnow
from issuance.workers.handlers import handle_claim
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import claim
from tests.integration.office_support import PASSWORD, add_user, empty_office, office_app

ARTIFACTS = Path(__file__).parents[1] / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
]
BANNER = "https://cdn.example.test/banners/double-eleven.svg"
# The CDN is not on this machine: the browser is handed this image instead.
BANNER_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="640" height="200" viewBox="0 0 640 200">'
    '<rect width="640" height="200" fill="#e23b2e"/><circle cx="560" cy="40" r="90" fill="#f7c948"/>'
    '<text x="32" y="120" font-size="64" font-family="sans-serif" fill="#fff">双十一红包</text></svg>'
)
SERIOUS = ("serious", "critical")


@pytest.fixture
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: `make browser` installs it"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def accessible(page: Page, name: str) -> None:
    """No serious or critical axe-core violation on the page."""
    results = Axe().run(page)
    serious = [v for v in results.response["violations"] if v["impact"] in SERIOUS]
    assert serious == [], f"{name}: " + "; ".join(
        f"{v['id']} ({v['impact']}): {[n['target'] for n in v['nodes']][:3]}" for v in serious
    )


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"office-{name}.png"), full_page=True)


def loaded(page: Page, selector: str, timeout: float = 15) -> None:
    """Wait until the image has been fetched and decoded (wait_for_function
    evaluates a string, which the back office's CSP forbids)."""
    deadline = time.monotonic() + timeout
    image = page.locator(selector)
    while not image.evaluate("img => img.complete && img.naturalWidth > 0"):
        assert time.monotonic() < deadline, f"{selector} did not load"
        time.sleep(0.1)


def local(at: object) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S")  # type: ignore[attr-defined]


def test_an_operator_runs_a_campaign(settings, pool, browser: Browser) -> None:
    empty_office(settings)
    add_user(settings, "olga", "operator")
    ARTIFACTS.mkdir(exist_ok=True)
    with office_app(settings, approval_threshold=10_000) as office:
        context = browser.new_context(viewport={"width": 1280, "height": 860}, accept_downloads=True)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.route(
            "https://cdn.example.test/**",
            lambda route: route.fulfill(status=200, content_type="image/svg+xml", body=BANNER_SVG),
        )

        # Sign in.
        page.goto(f"{office.url}/activities")
        expect(page).to_have_title("Sign in · Coupon back office")
        accessible(page, "sign-in")
        page.get_by_label("Name").fill("olga")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("heading", name="Activities")).to_be_visible()

        # A channel.
        page.get_by_role("link", name="Channels").click()
        page.get_by_label("New channel name").fill("wechat-group")
        page.get_by_role("button", name="Create channel").click()
        expect(page.get_by_role("status")).to_have_text("channel wechat-group created")
        expect(page.get_by_role("cell", name="wechat-group")).to_be_visible()
        accessible(page, "channels")

        # An activity: the first try ends before it starts and is refused on the field.
        page.get_by_role("link", name="Activities").click()
        page.get_by_role("link", name="New activity").click()
        starts = utcnow() - timedelta(hours=1)
        page.get_by_label("Slug (the page's address)").fill("double-eleven")
        page.get_by_label("Title (shown in the browser's title bar)").fill("Double Eleven red envelope")
        page.get_by_label("Channel").select_option("wechat-group")
        page.get_by_label("Brand").fill("Acme Mall")
        page.get_by_label("Starts at").fill(local(starts))
        page.get_by_label("Ends at").fill(local(starts - timedelta(days=1)))
        page.get_by_label("Time zone").fill("UTC")
        page.get_by_label("Budget (packages)").fill("500")
        page.get_by_label("Template 1 prefix").fill("DBL")
        page.get_by_label("Template 1 value").fill("1000")
        page.get_by_label("Template 1 threshold in cents").fill("5000")
        page.get_by_label("Template 1 title").fill("满50减10")
        page.get_by_role("button", name="Create activity").click()
        ends = page.get_by_label("Ends at")
        expect(ends).to_have_attribute("aria-invalid", "true")
        expect(page.locator("#ends_at-error")).to_have_text("an activity must end after it starts")
        accessible(page, "activity form with errors")
        shot(page, "activity-errors")
        ends.fill(local(starts + timedelta(days=7)))
        page.get_by_role("button", name="Create activity").click()
        expect(page.get_by_role("heading", name="Double Eleven red envelope (double-eleven)")).to_be_visible()
        expect(page.get_by_role("status").first).to_have_text("activity double-eleven created")

        # Codes: generate a batch, watch it, export it.
        page.get_by_role("link", name="Templates and code batches").click()
        page.get_by_label("How many codes").fill("20000")
        page.get_by_role("button", name="Generate").click()
        expect(page.get_by_role("heading", name="Generating 20000 codes for DBL")).to_be_visible()
        expect(page.locator("#job-status")).to_contain_text("Done: batch", timeout=60_000)
        expect(page.locator("#job-bar")).to_have_attribute("value", "100")
        accessible(page, "generation progress")
        with page.expect_download() as download:
            page.get_by_role("link", name="Export the batch as CSV").click()
        exported = Path(download.value.path())
        with exported.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == 20000 and all(r["code"].startswith("DBL") for r in rows)
        page.get_by_role("link", name="Back to templates and batches").click()
        expect(page.get_by_role("cell", name="20000").first).to_be_visible()
        accessible(page, "templates and batches")

        # The banner: the preview follows the URL as it is typed, and stays once saved.
        page.get_by_role("link", name="Back to the activity").click()
        page.get_by_label("Banner image URL").fill(BANNER)
        preview = page.get_by_role("img", name="Banner preview")
        expect(preview).to_have_attribute("src", BANNER)
        loaded(page, "#banner-preview")
        page.get_by_label("Copy (the text under the banner)").fill("Open the red envelope, share the luck!")
        page.get_by_role("button", name="Save changes").click()
        expect(page.get_by_role("status").first).to_have_text("double-eleven: banner_url, copy")
        expect(preview).to_have_attribute("src", BANNER)
        loaded(page, "#banner-preview")
        accessible(page, "activity")
        shot(page, "activity")

        # Members claim; the report shows it.
        for _ in range(12):
            handle_claim(pool, settings, claim("double-eleven"))
        page.get_by_role("link", name="Campaign report").click()
        expect(page.get_by_role("heading", name="Rates")).to_be_visible()
        expect(page.locator("dd").filter(has_text="(12 of 500 packages)")).to_contain_text("2.4%")
        chart = page.get_by_role("img", name="Chart of claims granted and credited")
        loaded(page, "img.chart")
        expect(chart).to_be_visible()
        accessible(page, "report")
        shot(page, "report")

        # The list, as the seed describes it; and the other pages.
        page.get_by_role("link", name="Activities").click()
        row = page.get_by_role("row").filter(has_text="double-eleven")
        expect(row).to_contain_text("wechat-group")
        expect(row).to_contain_text("DBL")
        expect(row).to_contain_text("7 days")
        expect(row).to_contain_text("running")
        accessible(page, "activities")
        shot(page, "activities")
        for name, heading in (
            ("Lookup", "Member and code lookup"),
            ("Approvals", "Budget approvals"),
            ("Dead letters", "Dead letters"),
            ("Audit log", "Audit log"),
        ):
            page.get_by_role("navigation", name="Main").get_by_role("link", name=name).click()
            expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible()
            accessible(page, name)
        expect(page.get_by_role("cell", name="generate")).to_be_visible()
        shot(page, "audit")
        code = rows[0]["code"]
        page.get_by_role("link", name="Lookup").click()
        page.get_by_label("Coupon code").fill(code)
        page.get_by_role("button", name="Find code").click()
        expect(page.get_by_role("heading", name=f"Code {code}")).to_be_visible()
        assert errors == []
        context.close()
    assert (ARTIFACTS / "office-report.png").stat().st_size > 20_000
