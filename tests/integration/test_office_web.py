"""The back office on the web against the real PostgreSQL: sign-in and
roles, CSRF, the audit log, the activity form's validation (the catalog's
rules, shown by field), the list's pages and filters, budget approval, code
batches with their progress and CSV export, the report, dead letters and
member and code lookup."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from issuance.shared.backoffice import catalog
from issuance.shared.db import database, store
from issuance.shared.domain import CODE_ALPHABET
from issuance.shared.wire.messages import utcnow
from issuance.workers.handlers import handle_claim
from sqlalchemy.orm import Session
from starlette.routing import Route

from tests.conftest import claim, make_activity, take_all
from tests.integration.office_support import (
    PASSWORD,
    Served,
    add_user,
    audit_rows,
    client,
    empty_office,
    office_app,
    sign_in,
    token,
)

ROOT = Path(__file__).parents[2]
THRESHOLD = 1000


@pytest.fixture
def app(settings) -> Iterator[Served]:
    empty_office(settings)
    for name, role in (("olga", "operator"), ("vera", "viewer"), ("abe", "approver")):
        add_user(settings, name, role)
    with office_app(settings, approval_threshold=THRESHOLD) as office:
        yield office


def post_routes(office: Served) -> list[str]:
    """Every POST path of the app (path parameters filled in)."""
    paths = []
    for route in office.app.routes:
        if isinstance(route, Route) and "POST" in (route.methods or ()):
            paths.append(
                route.path.replace("{slug}", "some-activity")
                .replace("{approval:int}", "1")
                .replace("{dead_letter:int}", "1")
            )
    return paths


def activity_form(slug: str, /, **overrides: Any) -> dict[str, str]:
    starts = utcnow() - timedelta(hours=1)
    form = {
        "slug": slug,
        "title": f"Red envelope {slug}",
        "channel": "app",
        "brand": "Acme Mall",
        "banner_url": "",
        "copy": "",
        "rules": "",
        "starts_at": starts.strftime("%Y-%m-%dT%H:%M:%S"),
        "ends_at": (starts + timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%S"),
        "timezone": "UTC",
        "budget": "100",
        "online": "on",
        "validity_days": "7",
        "rebate_every": "3",
        "t0_prefix": "RED",
        "t0_kind": "amount_off",
        "t0_value": "1000",
        "t0_threshold_cents": "5000",
        "t0_title": "10 off 50",
    }
    form.update(overrides)
    return {k: v for k, v in form.items() if v is not None}


def create_channel(client: httpx.Client, name: str = "app") -> None:
    answer = client.post("/channels", data={"name": name, "csrf_token": token(client, "/channels")})
    assert answer.status_code == 303, answer.text


def count(settings, sql: str, *params: Any) -> int:
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute(sql, params).fetchone()
    assert row is not None
    return int(row[0])


def test_pages_need_a_signed_in_user(app, settings):
    anonymous = client(app)
    answer = anonymous.get("/activities")
    assert answer.status_code == 303
    assert answer.headers["location"] == "/login?next=%2Factivities"
    wrong = anonymous.post(
        "/login", data={"name": "olga", "password": "not it at all", "csrf_token": token(anonymous)}
    )
    assert wrong.status_code == 401
    assert "wrong name or password" in wrong.text
    unknown = anonymous.post(
        "/login", data={"name": "nobody", "password": PASSWORD, "csrf_token": token(anonymous)}
    )
    assert unknown.status_code == 401
    signed = sign_in(app, "olga")
    assert signed.get("/activities").status_code == 200
    assert [r["action"] for r in audit_rows(settings, "sign-in")] == ["sign-in"]


def test_sign_in_goes_back_only_to_a_local_page(app):
    anonymous = client(app)
    for target, expected in (
        ("/channels", "/channels"),
        ("//evil.example", "/activities"),
        ("https://x.y", "/activities"),
    ):
        form = {"name": "olga", "password": PASSWORD, "next": target, "csrf_token": token(anonymous)}
        answer = anonymous.post("/login", data=form)
        assert answer.headers["location"] == expected


def test_a_viewer_reads_everything_and_changes_nothing(app, settings):
    operator = sign_in(app, "olga")
    create_channel(operator)
    viewer = sign_in(app, "vera")
    before = audit_rows(settings)
    for path in ("/activities", "/channels", "/approvals", "/dead-letters", "/lookup", "/audit"):
        assert viewer.get(path).status_code == 200, path
    csrf = token(viewer, "/activities")
    paths = post_routes(app)
    assert len(paths) >= 8
    for path in paths:
        if path in ("/login", "/logout"):
            continue
        answer = viewer.post(path, data={"csrf_token": csrf, "name": "viewer-channel", "online": "false"})
        assert answer.status_code == 403, path
    assert audit_rows(settings) == before
    assert count(settings, "SELECT count(*) FROM channels WHERE name = 'viewer-channel'") == 0
    # Viewers see no change controls either.
    assert "Create channel" not in viewer.get("/channels").text


def test_every_post_without_the_csrf_token_is_refused(app, settings):
    operator = sign_in(app, "olga")
    good = token(operator, "/channels")
    for path in post_routes(app):
        assert operator.post(path, data={"name": "x"}).status_code == 403, path
        assert operator.post(path, data={"name": "x", "csrf_token": good[:-2] + "zz"}).status_code == 403, (
            path
        )
    # The right token from another site is refused as well.
    foreign = operator.post(
        "/channels", data={"name": "x", "csrf_token": good}, headers={"origin": "https://evil.example"}
    )
    assert foreign.status_code == 403
    # A token belongs to its session: another session's token does not work.
    other = sign_in(app, "olga")
    assert other.post("/channels", data={"name": "x", "csrf_token": good}).status_code == 403
    assert count(settings, "SELECT count(*) FROM channels") == 0
    assert operator.post("/channels", data={"name": "x", "csrf_token": good}).status_code == 303


def test_an_approver_cannot_make_operators_changes(app):
    approver = sign_in(app, "abe")
    answer = approver.post("/channels", data={"name": "x", "csrf_token": token(approver, "/channels")})
    assert answer.status_code == 403


def test_security_headers_on_every_answer(app):
    anonymous = client(app)
    first = anonymous.get("/login")
    for answer in (first, anonymous.get("/activities"), anonymous.get("/static/office.css")):
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["cache-control"] == "no-store"
    cookie = first.headers["set-cookie"].lower()
    assert cookie.startswith("office_session=")
    assert "httponly" in cookie and "samesite=strict" in cookie


def test_channels_are_created_once_and_audited(app, settings):
    operator = sign_in(app, "olga")
    create_channel(operator, "wechat-group")
    again = operator.post(
        "/channels", data={"name": "wechat-group", "csrf_token": token(operator, "/channels")}
    )
    assert again.status_code == 422
    assert "channel &#39;wechat-group&#39; already exists" in again.text
    rows = audit_rows(settings, "create")
    channel_rows = [r for r in rows if r["subject_kind"] == "channel"]
    assert channel_rows == [
        {
            "actor": "olga",
            "action": "create",
            "subject_kind": "channel",
            "subject_key": "wechat-group",
            "before": None,
            "after": {"name": "wechat-group"},
        }
    ]


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"ends_at": "2020-01-01T00:00:00"}, "ends_at", "an activity must end after it starts"),
        ({"slug": "Bad Slug"}, "slug", "must be lowercase letters, digits and dashes"),
        ({"budget": "lots"}, "budget", "enter a whole number"),
        ({"budget": "-5"}, "budget", "the budget cannot be negative"),
        ({"t0_prefix": None}, "templates", "a package holds 1 to 5 coupon templates"),
        ({"t0_kind": "discount_rate", "t0_value": "20000"}, "templates", "a discount rate is 1 to 10000"),
        ({"timezone": "Mars/Olympus"}, "timezone", "unknown time zone"),
        ({"channel": "nowhere"}, "channel", "no channel &#39;nowhere&#39;"),
        ({"validity_days": ""}, "validity_days", "set validity_days or a fixed validity window"),
        ({"t0_value": "ten"}, "t0_value", "enter a whole number"),
        ({"validity_days": "-1"}, "validity_days", "validity_days must be 0 to 3650 days, got -1"),
        ({"t0_rules": "{"}, "t0_rules", "enter the rules as a JSON object"),
        ({"t0_rules": '{"colour": 1}'}, "t0_rules", "unknown rules colour"),
        ({"t0_rules": '{"priority": 2.5}'}, "templates", "priority must be a whole number, got 2.5"),
        (
            {"t0_rules": '{"per_person_limit": -1}'},
            "templates",
            "per_person_limit must be a whole number from 1",
        ),
    ],
)
def test_the_activity_form_shows_the_catalogs_rules_by_field(app, settings, overrides, field, message):
    operator = sign_in(app, "olga")
    create_channel(operator)
    form = activity_form("bad-one", **overrides)
    answer = operator.post("/activities/new", data={**form, "csrf_token": token(operator, "/activities/new")})
    assert answer.status_code == 422
    error_id = f'id="{field}-error">'
    assert error_id in answer.text, answer.text[:3000]
    assert message in answer.text.split(error_id, 1)[1].split("</p>", 1)[0]
    # What was typed is shown again.
    assert 'value="Red envelope bad-one"' in answer.text
    assert count(settings, "SELECT count(*) FROM activities") == 0
    assert audit_rows(settings, "create")[-1]["subject_kind"] == "channel"


def test_create_and_edit_an_activity_with_its_audit_trail(app, settings):
    operator = sign_in(app, "olga")
    create_channel(operator)
    form = activity_form("spring")
    created = operator.post(
        "/activities/new", data={**form, "csrf_token": token(operator, "/activities/new")}
    )
    assert created.status_code == 303 and created.headers["location"] == "/activities/spring"
    page = operator.get("/activities/spring")
    assert page.status_code == 200
    assert 'value="Red envelope spring"' in page.text
    entry = next(r for r in audit_rows(settings, "create") if r["subject_kind"] == "activity")
    assert entry["actor"] == "olga" and entry["before"] is None
    assert entry["after"]["budget"] == 100 and entry["after"]["templates"][0]["prefix"] == "RED"

    edited = dict(
        form,
        title="Spring red envelope",
        banner_url="https://cdn.example.com/spring.png",
        budget="150",
        copy="Open the envelope",
    )
    answer = operator.post(
        "/activities/spring", data={**edited, "csrf_token": token(operator, "/activities/spring")}
    )
    assert answer.status_code == 303
    edit = audit_rows(settings, "edit")[-1]
    assert edit["subject_key"] == "spring"
    assert edit["before"] == {"title": "Red envelope spring", "banner_url": "", "copy": "", "budget": 100}
    assert edit["after"] == {
        "title": "Spring red envelope",
        "banner_url": "https://cdn.example.com/spring.png",
        "copy": "Open the envelope",
        "budget": 150,
    }
    assert (
        count(
            settings,
            "SELECT count(*) FROM package_slots p JOIN activities a USING (activity_id)"
            " WHERE a.slug = 'spring'",
        )
        == 150
    )
    shown = operator.get("/activities/spring").text
    assert 'id="banner-preview" alt="Banner preview" src="https://cdn.example.com/spring.png"' in shown
    assert '<p class="card-copy" id="preview-copy">Open the envelope</p>' in shown


def test_a_templates_rules_and_the_regions_survive_an_edit_from_the_form(app, settings):
    operator = sign_in(app, "olga")
    create_channel(operator)
    rules = '{"scope_stores": ["S1"], "stackable": false, "per_person_limit": 2}'
    form = activity_form("ruled", t0_rules=rules, regions="Jiangsu, 上海")
    created = operator.post(
        "/activities/new", data={**form, "csrf_token": token(operator, "/activities/new")}
    )
    assert created.status_code == 303, created.text[:2000]
    stored = (
        "SELECT t.scope_stores, t.stackable, t.per_person_limit, a.regions"
        " FROM coupon_templates t JOIN activities a USING (activity_id)"
    )
    with psycopg.connect(settings.database_url) as conn:
        before = conn.execute(stored).fetchone()
    assert before == (["S1"], False, 2, ["Jiangsu", "上海"])
    # The form shows them, and saving it with another title keeps them.
    page = operator.get("/activities/ruled").text
    assert 'name="t0_rules"' in page and "scope_stores" in page and 'value="Jiangsu, 上海"' in page
    from issuance.shared.backoffice.web import forms

    with Session(database.engine(settings)) as session:
        from issuance.shared.db.models import Activity
        from sqlalchemy import select

        shown = forms.render(catalog.describe_activity(session, session.scalars(select(Activity)).one()))
    edited = {**shown, "title": "Ruled envelope"}
    answer = operator.post(
        "/activities/ruled", data={**edited, "csrf_token": token(operator, "/activities/ruled")}
    )
    assert answer.status_code == 303
    with psycopg.connect(settings.database_url) as conn:
        assert conn.execute(stored).fetchone() == before


def test_saving_an_untouched_form_changes_nothing(app, settings):
    """An activity made by the CLI (times with microseconds) saved from the
    form as it was shown: no field changes, nothing is audited."""
    act = make_activity(settings, codes=0)
    operator = sign_in(app, "olga")
    page = operator.get(f"/activities/{act['slug']}").text
    from issuance.shared.backoffice.web import forms

    with Session(database.engine(settings)) as session:
        from issuance.shared.db.models import Activity
        from sqlalchemy import select

        spec = catalog.describe_activity(session, session.scalars(select(Activity)).one())
    shown = forms.render(spec)
    assert f'value="{shown["starts_at"]}"' in page
    answer = operator.post(
        f"/activities/{act['slug']}", data={**shown, "csrf_token": token(operator, "/activities")}
    )
    assert answer.status_code == 303
    assert audit_rows(settings, "edit") == []
    follow = operator.get(f"/activities/{act['slug']}")
    assert "nothing changed" in follow.text


def test_live_edits_refused_by_the_catalog_are_shown_on_the_field(app, settings, pool):
    act = make_activity(settings, codes=5)
    handle_claim(pool, settings, claim(act["slug"]))
    operator = sign_in(app, "olga")
    with Session(database.engine(settings)) as session:
        from issuance.shared.backoffice.web import forms
        from issuance.shared.db.models import Activity
        from sqlalchemy import select

        shown = forms.render(catalog.describe_activity(session, session.scalars(select(Activity)).one()))
    changed = dict(shown, validity_days="30")
    answer = operator.post(
        f"/activities/{act['slug']}", data={**changed, "csrf_token": token(operator, "/activities")}
    )
    assert answer.status_code == 422
    error = answer.text.split('id="validity_days-error">', 1)[1].split("</p>", 1)[0]
    assert "packages issued; cannot change validity_days" in error
    assert audit_rows(settings, "edit") == []


def test_the_list_pages_15_newest_first_with_filters(app, settings):
    engine = database.engine(settings)
    start = utcnow()
    with Session(engine) as session, session.begin():
        catalog.create_channel(session, "app")
        catalog.create_channel(session, "partner")
        for n in range(17):
            spec = catalog.ActivitySpec(
                slug=f"act-{n:02d}",
                title=f"Activity {n:02d}" + (" double eleven" if n % 5 == 0 else ""),
                channel="partner" if n % 4 == 0 else "app",
                starts_at=start,
                ends_at=start + timedelta(days=1),
                budget=10,
                online=n % 3 != 0,
                templates=(catalog.TemplateSpec(prefix=f"QA{CODE_ALPHABET[n]}", kind="gift", value=1),),
            )
            catalog.create_activity(session, spec)
            session.flush()
    engine.dispose()
    operator = sign_in(app, "olga")

    def slugs(query: str) -> list[str]:
        page = operator.get("/activities" + query)
        assert page.status_code == 200
        return [
            part.split('"', 1)[0]
            for part in page.text.split('<a href="/activities/')[1:]
            if "/" not in part.split('"', 1)[0] and part.split('"', 1)[0] != "new"
        ][::1]

    first = list(dict.fromkeys(slugs("")))
    assert first == [f"act-{n:02d}" for n in range(16, 1, -1)]
    assert "page 1 of 2" in operator.get("/activities").text
    assert list(dict.fromkeys(slugs("?page=2"))) == ["act-01", "act-00"]
    assert list(dict.fromkeys(slugs("?channel=partner"))) == [
        "act-16",
        "act-12",
        "act-08",
        "act-04",
        "act-00",
    ]
    assert list(dict.fromkeys(slugs("?status=offline"))) == [f"act-{n:02d}" for n in (15, 12, 9, 6, 3, 0)]
    assert list(dict.fromkeys(slugs("?q=DOUBLE"))) == ["act-15", "act-10", "act-05", "act-00"]
    assert list(dict.fromkeys(slugs("?q=%25"))) == []
    listing = operator.get("/activities?channel=partner").text
    for column in (
        "Channel",
        "Coupon prefixes",
        "Package validity",
        "Activity window",
        "Activity URL",
        "Operation",
    ):
        assert f">{column}</th>" in listing
    assert "http://127.0.0.1:8000/a/act-16" in listing and "7 days" in listing


def test_a_large_budget_waits_for_an_approver(app, settings):
    operator = sign_in(app, "olga")
    create_channel(operator)
    form = activity_form("big-sale", budget=str(THRESHOLD + 1))
    assert (
        operator.post(
            "/activities/new", data={**form, "csrf_token": token(operator, "/activities/new")}
        ).status_code
        == 303
    )
    assert count(settings, "SELECT count(*) FROM activities WHERE slug = 'big-sale' AND online") == 0
    # Putting it online is held too.
    operator.post(
        "/activities/big-sale/online", data={"online": "true", "csrf_token": token(operator, "/activities")}
    )
    assert count(settings, "SELECT count(*) FROM activities WHERE slug = 'big-sale' AND online") == 0
    assert "waits for an approver" in operator.get("/activities/big-sale").text
    assert "awaiting approval" in operator.get("/activities?status=awaiting").text
    requests = count(settings, "SELECT count(*) FROM office_budget_approvals WHERE status = 'pending'")
    assert requests == 1
    approval_id = count(settings, "SELECT approval_id FROM office_budget_approvals")
    # The operator cannot approve it; the approver can.
    decision = {"decision": "approve"}
    assert (
        operator.post(
            f"/approvals/{approval_id}", data={**decision, "csrf_token": token(operator, "/approvals")}
        ).status_code
        == 403
    )
    approver = sign_in(app, "abe")
    assert "Approve" in approver.get("/approvals").text
    answer = approver.post(
        f"/approvals/{approval_id}", data={**decision, "csrf_token": token(approver, "/approvals")}
    )
    assert answer.status_code == 303
    assert count(settings, "SELECT count(*) FROM activities WHERE slug = 'big-sale' AND online") == 1
    actions = [(r["actor"], r["action"]) for r in audit_rows(settings) if r["subject_key"] == "big-sale"]
    assert actions == [
        ("olga", "create"),
        ("olga", "request-approval"),
        ("olga", "request-approval"),
        ("abe", "approve-budget"),
        ("abe", "edit"),
    ]
    # Within the approved budget, no new approval; above it, offline again.
    shown = operator.get("/activities/big-sale").text
    assert "Approved budget: 1001 packages" in shown
    raised = dict(form, budget=str(THRESHOLD * 2))
    operator.post("/activities/big-sale", data={**raised, "csrf_token": token(operator, "/activities")})
    assert count(settings, "SELECT count(*) FROM activities WHERE slug = 'big-sale' AND online") == 0
    assert count(settings, "SELECT count(*) FROM office_budget_approvals WHERE status = 'pending'") == 1


def test_generate_a_batch_with_progress_and_export_it(app, settings):
    act = make_activity(settings, codes=0)
    prefix = act["prefixes"][0]
    operator = sign_in(app, "olga")
    page = operator.get(f"/activities/{act['slug']}/codes")
    assert f'<option value="{prefix}">' in page.text
    bad = operator.post(
        f"/activities/{act['slug']}/codes",
        data={"template": prefix, "count": "none", "csrf_token": token(operator, "/activities")},
    )
    assert bad.status_code == 422 and 'id="count-error"' in bad.text
    started = operator.post(
        f"/activities/{act['slug']}/codes",
        data={"template": prefix, "count": "2500", "csrf_token": token(operator, "/activities")},
    )
    assert started.status_code == 303
    job_url = started.headers["location"]
    assert "<progress" in operator.get(job_url).text
    deadline = time.monotonic() + 60
    while True:
        progress = operator.get(job_url + "/progress").json()
        if progress["finished"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert progress["finished"] and progress["error"] == "" and progress["done"] == 2500
    assert progress["percent"] == 100
    batch = progress["batch"]
    exported = operator.get(f"/batches/{batch}.csv")
    assert exported.status_code == 200
    assert exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert len(rows) == 2500 and len({r["code"] for r in rows}) == 2500
    assert all(r["code"].startswith(prefix) and r["status"] == "available" for r in rows)
    assert operator.get("/batches/999999.csv").status_code == 404
    generated = audit_rows(settings, "generate")
    assert generated[-1]["subject_key"] == str(batch)
    assert generated[-1]["after"] == {"template": prefix, "size": 2500, "activity": act["slug"]}
    assert [r["subject_key"] for r in audit_rows(settings, "export")] == [str(batch)]
    # A viewer neither generates nor exports codes.
    viewer = sign_in(app, "vera")
    assert viewer.get(f"/batches/{batch}.csv").status_code == 403


def test_the_report_shows_the_campaign_and_its_chart(app, settings, pool):
    act = make_activity(settings, codes=10, budget=4)
    operator = sign_in(app, "olga")
    empty = operator.get(f"/activities/{act['slug']}/report")
    assert empty.status_code == 200 and "No claim granted yet" in empty.text
    assert operator.get(f"/activities/{act['slug']}/chart.png").status_code == 404
    for _ in range(3):
        handle_claim(pool, settings, claim(act["slug"]))
    report = operator.get(f"/activities/{act['slug']}/report").text
    assert "Collect rate" in report and "75.0%" in report
    assert "claims credited: 3." in report
    assert "Past their deadline" in report
    chart = operator.get(f"/activities/{act['slug']}/chart.png")
    assert chart.status_code == 200 and chart.content.startswith(b"\x89PNG")


def test_dead_letters_are_listed_and_inspected_with_phones_masked(app, settings):
    with psycopg.connect(settings.database_url) as conn, conn.transaction():
        store.insert_dead_letter(
            conn,
            message_key="m-1",
            queue="claims",
            actor="claim_requested",
            reason="invalid_message",
            detail="phone is not a string",
            body='{"activity": "x", "phone": "+8613800138000"}',
        )
        dead_letter_id = conn.execute("SELECT dead_letter_id FROM dead_letters").fetchone()[0]
    viewer = sign_in(app, "vera")
    listing = viewer.get("/dead-letters").text
    assert "invalid_message" in listing and f"/dead-letters/{dead_letter_id}" in listing
    detail = viewer.get(f"/dead-letters/{dead_letter_id}").text
    assert "+86138******00" in detail and "13800138000" not in detail
    assert viewer.get("/dead-letters/999999").status_code == 404


def test_member_and_code_lookup(app, settings, pool):
    act = make_activity(settings, codes=5)
    outcome = handle_claim(pool, settings, claim(act["slug"], "+8613800138123"))
    code = outcome.codes[0]
    viewer = sign_in(app, "vera")
    found = viewer.get("/lookup", params={"phone": "138 0013 8123"}).text
    assert "+86138******23" in found and "13800138123" not in found
    assert code in found and act["slug"] in found and "credited" in found
    assert "please enter a correct mobile number" in viewer.get("/lookup", params={"phone": "12345"}).text
    assert "no member has this number" in viewer.get("/lookup", params={"phone": "13800138999"}).text
    by_code = viewer.get("/lookup", params={"code": code.lower()}).text
    assert f"Code <code>{code}</code>" in by_code and "+86138******23" in by_code
    assert "no such code" in viewer.get("/lookup", params={"code": "NOPE123456"}).text


def test_the_cli_creates_the_first_user(settings, service_env):
    import os

    empty_office(settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISSUANCE_")} | service_env
    argv = [
        sys.executable,
        "-m",
        "issuance.shared.cli",
        "office",
        "user-add",
        "root-op",
        "--role",
        "operator",
    ]
    made = subprocess.run(
        argv,
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    assert "user root-op (operator)" in made.stdout
    short = subprocess.run(
        [*argv[:-3], "other", "--role", "viewer"],
        input="short\n",
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert short.returncode == 2 and "at least 12 characters" in short.stderr
    with psycopg.connect(settings.database_url) as conn:
        stored = conn.execute("SELECT password_hash FROM office_users WHERE name = 'root-op'").fetchone()[0]
    assert stored.startswith("$argon2id$") and PASSWORD not in stored
    assert audit_rows(settings)[0]["subject_key"] == "root-op"
    assert audit_rows(settings)[0]["actor"].startswith("cli:")
    with office_app(settings) as office:
        assert sign_in(office, "root-op").get("/channels").status_code == 200


def test_the_cli_serves_the_back_office(settings, service_env, tmp_path):
    import os
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISSUANCE_")} | service_env
    argv = [sys.executable, "-m", "issuance.shared.cli", "office", "serve", "--port", str(port)]
    log = tmp_path / "office.log"
    with log.open("wb") as out:
        server = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/lookup?phone=13800138000", timeout=5)
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.2)
        assert answer.status_code == 303 and answer.headers["location"].startswith("/login")
        assert answer.headers["x-frame-options"] == "DENY"
    finally:
        server.terminate()
        server.wait(timeout=30)
    logged = log.read_text()
    # One line per request, without the query string (it can hold a phone number).
    assert "GET /lookup 303" in logged
    assert "13800138000" not in logged


def test_the_audit_log_is_append_only(app, settings):
    operator = sign_in(app, "olga")
    create_channel(operator, "kept")
    with psycopg.connect(settings.database_url) as conn:
        for sql in ("UPDATE office_audit SET actor = 'someone else'", "DELETE FROM office_audit"):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"), conn.transaction():
                conn.execute(sql)
    assert [r["subject_key"] for r in audit_rows(settings, "create") if r["subject_kind"] == "channel"] == [
        "kept"
    ]


def test_five_wrong_passwords_lock_the_name_for_a_while(app, settings):
    anonymous = client(app)
    for _ in range(5):
        form = {"name": "olga", "password": "guessing again", "csrf_token": token(anonymous)}
        assert anonymous.post("/login", data=form).status_code == 401
    locked = client(app)
    form = {"name": "olga", "password": PASSWORD, "csrf_token": token(locked)}
    assert locked.post("/login", data=form).status_code == 401
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute("UPDATE office_users SET locked_until = now() - interval '1 second' WHERE name = 'olga'")
    assert sign_in(app, "olga").get("/activities").status_code == 200
    # Another name was never locked.
    assert sign_in(app, "vera").get("/activities").status_code == 200


def test_a_waiting_request_is_withdrawn_when_an_edit_makes_it_moot(app, settings):
    operator = sign_in(app, "olga")
    create_channel(operator)
    for slug in ("lowered", "parked"):
        form = activity_form(slug, budget=str(THRESHOLD * 3), t0_prefix="L" + slug[0].upper() + "W")
        operator.post("/activities/new", data={**form, "csrf_token": token(operator, "/activities/new")})
    assert count(settings, "SELECT count(*) FROM office_budget_approvals WHERE status = 'pending'") == 2
    lowered = activity_form("lowered", budget=str(THRESHOLD), t0_prefix="LLW", online=None)
    operator.post("/activities/lowered", data={**lowered, "csrf_token": token(operator, "/activities")})
    operator.post(
        "/activities/parked/online", data={"online": "false", "csrf_token": token(operator, "/activities")}
    )
    with psycopg.connect(settings.database_url) as conn:
        statuses = dict(
            conn.execute(
                "SELECT a.slug, b.status FROM office_budget_approvals b JOIN activities a USING (activity_id)"
            ).fetchall()
        )
    assert statuses == {"lowered": "withdrawn", "parked": "withdrawn"}
    assert [r["subject_key"] for r in audit_rows(settings, "withdraw-approval")] == ["lowered", "parked"]
    # Lowered within the threshold, it may go online without an approver.
    operator.post(
        "/activities/lowered/online", data={"online": "true", "csrf_token": token(operator, "/activities")}
    )
    assert count(settings, "SELECT count(*) FROM activities WHERE slug = 'lowered' AND online") == 1


def test_an_operator_replays_a_dead_letter_once_and_it_is_audited(app, settings):
    """The back office replays like `issuance dead-letters replay --id N`."""
    body = {
        "queue_name": "credits",
        "actor_name": "credit_claim",
        "args": [{"v": 1, "claim_ids": ["5e4d3c2b-1a09-4f8e-8d7c-6b5a49382716"]}],
        "kwargs": {},
        "options": {},
        "message_id": "0b6c7a4e-5d1f-4e7a-9c3b-2a1d0e9f8c7b",
        "message_timestamp": 1,
    }
    with psycopg.connect(settings.database_url) as conn, conn.transaction():
        store.insert_dead_letter(
            conn,
            message_key=body["message_id"],
            queue="credits",
            actor="credit_claim",
            reason="rejected",
            detail="rejected by the broker (rejected)",
            body=orjson.dumps(body).decode(),
            headers={"original": "stored"},
        )
        dead_letter_id = conn.execute("SELECT dead_letter_id FROM dead_letters").fetchone()[0]
    operator = sign_in(app, "olga")
    path = f"/dead-letters/{dead_letter_id}"
    assert f'action="{path}/replay"' in operator.get(path).text
    first = operator.post(f"{path}/replay", data={"csrf_token": token(operator, path)})
    assert first.status_code == 303
    assert "published again" in operator.get(path).text
    again = operator.post(f"{path}/replay", data={"csrf_token": token(operator, path)})
    assert again.status_code == 303
    assert "not replayed" in operator.get(path).text
    assert len(take_all(settings, "credits")) == 1, "published once"
    replays = audit_rows(settings, "replay")
    assert [r["subject_key"] for r in replays] == [str(dead_letter_id)] * 2
    assert replays[0]["after"]["replayed"] == [dead_letter_id] and replays[1]["after"]["replayed"] == []
    assert "/replay" not in sign_in(app, "vera").get(path).text
