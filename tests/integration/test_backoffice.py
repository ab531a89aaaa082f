"""The back office against real PostgreSQL, and through the real CLI:
channels, activities (JSON/YAML files, safe live edits, budget slots, the
list), code batches (format, uniqueness, keyspace, collisions, CSV export)
and the campaign report."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tracemalloc
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
import yaml
from issuance.shared import domain
from issuance.shared.backoffice import catalog
from issuance.shared.db import database, store
from issuance.shared.wire.messages import utcnow
from issuance.workers.handlers import handle_claim
from sqlalchemy.orm import Session

from tests.conftest import claim, verify_clean
from tests.integration.lifecycle_support import activity_with, member_with_package, move, one, place, prefix

ROOT = Path(__file__).parents[2]


def issuance(service_env, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISSUANCE_")} | service_env
    result = subprocess.run(
        [sys.executable, "-m", "issuance.shared.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def session(settings) -> Session:
    return Session(database.engine(settings), expire_on_commit=False)


def edit(settings, slug: str, **changes) -> list[str]:
    with session(settings) as s, s.begin():
        return catalog.update_activity(s, slug, changes)


def test_channel_names_are_unique(settings, service_env):
    issuance(service_env, "channel", "create", "wechat-group")
    again = issuance(service_env, "channel", "create", "wechat-group", check=False)
    assert again.returncode == 2 and "already exists" in again.stderr
    with psycopg.connect(settings.database_url) as conn, pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("INSERT INTO channels (name) VALUES ('wechat-group')")


def test_an_activity_file_in_yaml_creates_every_field_and_lists_newest_first(settings, service_env, tmp_path):
    issuance(service_env, "channel", "create", "app")
    rewards = prefix()
    spec = {
        "slug": "double-eleven",
        "title": "Double Eleven red envelopes",
        "banner_url": "https://cdn.example.com/d11.png",
        "copy": "Share the luck",
        "rules": "One package per number",
        "brand": "Example Mall",
        "channel": "app",
        "starts_at": "2026-11-10T00:00:00+08:00",
        "ends_at": "2026-11-12T00:00:00+08:00",
        "timezone": "Asia/Shanghai",
        "online": True,
        "budget": 1000,
        "exclusivity_group": "singles-day",
        "validity_days": 7,
        "hold_until_registered": True,
        "rebate_every": 3,
        "rebate_amount_cents": 1000,
        "templates": [
            {"prefix": prefix(), "kind": "discount_rate", "value": 1500, "title": "15% off"},
            {"prefix": prefix(), "kind": "amount_off", "value": 2000, "threshold_cents": 10000},
            {"prefix": rewards, "kind": "gift", "value": 100, "new_user_only": True},
        ],
    }
    path = tmp_path / "d11.yaml"
    path.write_text(yaml.safe_dump(spec))
    issuance(service_env, "activity", "create", "--file", str(path))
    shown = yaml.safe_load(issuance(service_env, "activity", "show", "double-eleven").stdout)
    for key in ("title", "banner_url", "copy", "rules", "brand", "channel", "budget", "exclusivity_group"):
        assert shown[key] == spec[key]
    assert shown["templates"][2]["new_user_only"] is True
    assert shown["hold_until_registered"] is True and shown["rebate_amount_cents"] == 1000
    # Applying the same file again changes nothing.
    assert "unchanged" in issuance(service_env, "activity", "apply", "--file", str(path)).stdout

    for n in range(16):
        activity_with(settings, slug=f"filler-{n:02d}", codes=0, channel="app")
    first = json.loads(issuance(service_env, "activity", "list", "--json").stdout)
    second = json.loads(issuance(service_env, "activity", "list", "--page", "2", "--json").stdout)
    assert len(first) == 15 and [a["slug"] for a in second] == ["filler-00", "double-eleven"]
    assert first[0]["slug"] == "filler-15"
    d11 = second[1]
    assert d11["channel"] == "app" and d11["validity"] == "7 days"
    assert d11["prefixes"] == [t["prefix"] for t in spec["templates"]]
    assert d11["window"] == "2026-11-10 00:00 - 2026-11-12 00:00 Asia/Shanghai"
    assert d11["url"] == "http://127.0.0.1:8000/a/double-eleven"
    table = issuance(service_env, "activity", "list").stdout
    assert "filler-15" in table and "double-eleven" not in table


# An activity file as an operator writes it: times in the activity's zone,
# the rules as a block of lines.
HAND_WRITTEN = """\
slug: partners-envelope
title: Double Eleven partner envelope
channel: partners
starts_at: 2026-11-11T00:00:00+08:00
ends_at: 2026-11-14T00:00:00+08:00
timezone: Asia/Shanghai
budget: 20
validity_days: 7
rules: |
  One package per mobile number.
  Coupons expire at 24:00 on the seventh day after the claim.
templates:
  - {prefix: PREFIX, kind: amount_off, value: 1000, threshold_cents: 5000, title: "满50减10"}
"""


def test_show_prints_the_file_form_and_applying_it_changes_nothing(service_env, tmp_path):
    issuance(service_env, "channel", "create", "partners")
    template_prefix = prefix()
    written = HAND_WRITTEN.replace("PREFIX", template_prefix)
    (tmp_path / "written.yaml").write_text(written, encoding="utf-8")
    issuance(service_env, "activity", "create", "--file", str(tmp_path / "written.yaml"))

    shown = issuance(service_env, "activity", "show", "partners-envelope").stdout
    # Every line the operator wrote, but the template's (which show spells
    # out with its defaults), comes back as written: zone, times, rules.
    head = written.split("templates:")[0].splitlines()
    assert [line for line in head if line not in shown.splitlines()] == []
    assert yaml.safe_load(shown)["templates"] == [
        {
            "prefix": template_prefix,
            "kind": "amount_off",
            "value": 1000,
            "threshold_cents": 5000,
            "new_user_only": False,
            "title": "满50减10",
        }
    ]
    (tmp_path / "shown.yaml").write_text(shown, encoding="utf-8")
    applied = issuance(service_env, "activity", "apply", "--file", str(tmp_path / "shown.yaml")).stdout
    assert applied.strip() == "activity partners-envelope: unchanged"
    assert issuance(service_env, "activity", "show", "partners-envelope").stdout == shown


@pytest.mark.parametrize(
    ("templates", "message"),
    [
        ([], "1 to 5 coupon templates"),
        ([{"prefix": f"A{c}", "kind": "gift", "value": 1} for c in "BCDEFG"], "1 to 5 coupon templates"),
        ([{"prefix": "AB", "kind": "gift", "value": 1}] * 2, "unique platform-wide"),
        ([{"prefix": "A0", "kind": "gift", "value": 1}], "must use only"),
        ([{"prefix": "AB", "kind": "cashback", "value": 1}], "not discount_rate"),
        ([{"prefix": "AB", "kind": "discount_rate", "value": 10_001}], "basis points"),
    ],
)
def test_template_rules_are_checked(settings, templates, message):
    with pytest.raises(catalog.BackOfficeError, match=message):
        activity_with(settings, codes=0, templates=templates)


def test_a_prefix_is_unique_platform_wide(settings):
    taken = prefix()
    activity_with(settings, codes=0, templates=[{"prefix": taken, "kind": "gift", "value": 1}])
    with pytest.raises(catalog.BackOfficeError, match="unique platform-wide"):
        activity_with(settings, codes=0, templates=[{"prefix": taken, "kind": "gift", "value": 1}])


def test_budget_grows_and_shrinks_by_untaken_slots_never_below_what_is_issued(settings, pool):
    act = activity_with(settings, budget=3, codes=10)
    for _ in range(2):
        handle_claim(pool, settings, claim(act["slug"]))
    assert edit(settings, act["slug"], budget=6) == ["budget"]
    verify_clean(settings)
    assert edit(settings, act["slug"], budget=2) == ["budget"]
    verify_clean(settings)
    with pytest.raises(catalog.BackOfficeError, match="2 packages are issued"):
        edit(settings, act["slug"], budget=1)
    assert one(settings, "SELECT budget FROM activities WHERE slug = %s", act["slug"]) == 2
    assert handle_claim(pool, settings, claim(act["slug"])).reason == "sold_out"
    edit(settings, act["slug"], budget=3)
    assert handle_claim(pool, settings, claim(act["slug"])).status == "credited"
    verify_clean(settings)


def test_live_edits_allow_what_is_safe_and_refuse_the_rest(settings, pool, service_env):
    act = activity_with(settings, budget=5, codes=5)
    # Before any claim, even the templates may change.
    new_prefix = prefix()
    templates = [*act["templates"], {"prefix": new_prefix, "kind": "gift", "value": 100}]
    assert edit(settings, act["slug"], templates=templates, validity_days=3) == ["templates", "validity_days"]
    with session(settings) as s, s.begin():
        catalog.generate_codes(s, new_prefix, 5)
    assert handle_claim(pool, settings, claim(act["slug"])).status == "credited"
    changed = edit(
        settings,
        act["slug"],
        title="New title",
        banner_url="https://cdn.example.com/b.png",
        online=False,
        ends_at=utcnow() + timedelta(days=3),
    )
    assert set(changed) == {"title", "banner_url", "online", "ends_at"}
    for field, value in [
        ("validity_days", 10),
        ("timezone", "Europe/Paris"),
        ("exclusivity_group", "other"),
        ("starts_at", utcnow()),
        ("templates", act["templates"]),
    ]:
        with pytest.raises(catalog.BackOfficeError, match=f"packages issued; cannot change {field}"):
            edit(settings, act["slug"], **{field: value})
    refused = issuance(service_env, "activity", "edit", act["slug"], "--set", "validity_days=9", check=False)
    assert refused.returncode == 2 and "cannot change validity_days" in refused.stderr
    assert "online" in issuance(service_env, "activity", "edit", act["slug"], "--set", "online=true").stdout
    with pytest.raises(catalog.BackOfficeError, match="must end after it starts"):
        edit(settings, act["slug"], ends_at=utcnow() - timedelta(days=2))
    verify_clean(settings)


def test_a_batch_is_numbered_random_prefixed_and_unique(settings):
    p = prefix()
    activity_with(settings, codes=0, templates=[{"prefix": p, "kind": "gift", "value": 1}])
    with session(settings) as s, s.begin():
        first = catalog.generate_codes(s, p, 5000)
        second = catalog.generate_codes(s, p, 3000)
    assert second.batch_id == first.batch_id + 1
    codes = [
        r[0] for r in psycopg.connect(settings.database_url).execute("SELECT code FROM codes").fetchall()
    ]
    assert len(codes) == len(set(codes)) == 8000
    assert all(c.startswith(p) and 10 <= len(c) <= 16 for c in codes)
    assert all(set(c) <= set(domain.CODE_ALPHABET) for c in codes)
    assert domain.random_length(64) * 5 >= 64 and len(codes[0]) == len(p) + domain.random_length(64)
    # Symbols are spread evenly (a broken generator would skew them).
    counts = [sum(c[len(p) :].count(ch) for c in codes) for ch in domain.CODE_ALPHABET]
    assert max(counts) / min(counts) < 1.2
    with psycopg.connect(settings.database_url) as conn, pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(
            "INSERT INTO codes (code, template_id, batch_id)"
            " SELECT code, template_id, batch_id FROM codes LIMIT 1"
        )
    verify_clean(settings)


def test_a_colliding_chunk_is_drawn_again_until_the_batch_is_complete(settings, monkeypatch):
    p = prefix()
    activity_with(settings, codes=0, templates=[{"prefix": p, "kind": "gift", "value": 1}])
    with session(settings) as s, s.begin():
        catalog.generate_codes(s, p, 10)
    existing = [
        r[0] for r in psycopg.connect(settings.database_url).execute("SELECT code FROM codes").fetchall()
    ]
    real_block, real_codes = domain.sorted_code_block, domain.new_codes
    blocks: list[int] = []
    redrawn: list[int] = []

    def colliding_block(prefix_: str, count: int, bits: int = 64):
        blocks.append(count)
        block = real_block(prefix_, count, bits)
        if len(blocks) == 1:
            block[:3] = [list(c.encode()) for c in existing[:3]]
        return block

    def redraw(prefix_: str, count: int, bits: int = 64) -> list[str]:
        redrawn.append(count)
        return real_codes(prefix_, count, bits)

    monkeypatch.setattr(domain, "sorted_code_block", colliding_block)
    monkeypatch.setattr(domain, "new_codes", redraw)
    monkeypatch.setattr(catalog, "PROGRESS_CODES", 8)
    reported: list[int] = []
    with session(settings) as s, s.begin():
        batch = catalog.generate_codes(s, p, 50, chunk=20, progress=reported.append)
    assert one(settings, "SELECT count(*) FROM codes WHERE batch_id = %s", batch.batch_id) == 50
    assert blocks == [20, 20, 10]
    assert redrawn == [3], "the three losers are drawn again"
    # Each chunk's COPY is sent, and reported, in pieces; the losers once.
    assert reported == [8, 8, 4, 8, 8, 4, 8, 2]
    verify_clean(settings)


def test_the_capacity_check_counts_the_templates_codes_from_its_batches(settings, monkeypatch):
    p, other = prefix(), prefix()
    activity_with(
        settings, codes=0, templates=[{"prefix": q, "kind": "gift", "value": 1} for q in (p, other)]
    )
    with session(settings) as s, s.begin():
        catalog.generate_codes(s, p, 5000)
        catalog.generate_codes(s, p, 3000)
        catalog.generate_codes(s, other, 700)
    seen: list[int] = []
    real = domain.check_capacity

    def recording(prefix_: str, existing: int, requested: int, bits: int = 64) -> None:
        seen.append(existing)
        real(prefix_, existing, requested, bits)

    monkeypatch.setattr(domain, "check_capacity", recording)
    with session(settings) as s, s.begin():
        catalog.generate_codes(s, p, 10)
        catalog.generate_codes(s, other, 10)
    assert seen == [8000, 700]


def test_a_batch_that_cannot_be_unique_is_refused_before_generating(settings, service_env):
    p = prefix()
    activity_with(settings, codes=0, templates=[{"prefix": p, "kind": "gift", "value": 1}])
    with (
        session(settings) as s,
        s.begin(),
        pytest.raises(catalog.BackOfficeError, match="use more random bits"),
    ):
        catalog.generate_codes(s, p, 100_000, bits=35)  # 32^7 codes: at most 34,359 stay unguessable
    refused = issuance(
        service_env, "codes", "generate", "--template", p, "--count", "40000", "--bits", "35", check=False
    )
    assert refused.returncode == 2 and "exceed 34359" in refused.stderr
    short = issuance(
        service_env, "codes", "generate", "--template", p, "--count", "10", "--bits", "20", check=False
    )
    assert short.returncode == 2 and "codes must be 10 to 16 characters" in short.stderr
    assert one(settings, "SELECT count(*) FROM code_batches") == 0


def test_export_streams_the_batch_as_csv_any_number_of_times(settings, pool, service_env, tmp_path):
    act = activity_with(settings, budget=5, codes=1000)
    member, (bound,), _ = member_with_package(pool, settings, act["slug"])
    batch = one(settings, "SELECT batch_id FROM codes WHERE code = %s", bound)
    first = issuance(service_env, "codes", "export", "--batch", str(batch)).stdout
    out = tmp_path / "batch.csv"
    issuance(service_env, "codes", "export", "--batch", str(batch), "--out", str(out))
    assert out.read_text() == first
    rows = list(csv.DictReader(io.StringIO(first)))
    assert list(rows[0]) == ["code", "template", "status", "member", "bound_at", "expires_at"]
    assert len(rows) == 1000
    mine = next(r for r in rows if r["code"] == bound)
    assert (mine["status"], mine["member"]) == ("unused", str(member)) and mine["expires_at"]
    assert {r["template"] for r in rows} == {act["templates"][0]["prefix"]}
    missing = issuance(service_env, "codes", "export", "--batch", "999", check=False)
    assert missing.returncode == 2 and "no code batch 999" in missing.stderr


def test_export_memory_stays_flat_whatever_the_batch_size(settings):
    p = prefix()
    activity_with(settings, codes=0, templates=[{"prefix": p, "kind": "gift", "value": 1}])
    with session(settings) as s, s.begin():
        batch = catalog.generate_codes(s, p, 100_000)
    with psycopg.connect(settings.database_url) as conn:
        tracemalloc.start()
        size = sum(len(chunk) for chunk in catalog.export_batch(conn, batch.batch_id))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert size > 2_000_000
    assert peak < size / 10, f"peak {peak} bytes for a {size}-byte export"


def test_the_report_counts_what_the_campaign_offered_cost_and_brought(settings, pool, service_env):
    act = activity_with(settings, budget=10, codes=20, rebate_every=1, rebate_amount_cents=300)
    number = "+8613700137000"
    # A buyer whose order opened a share; two friends claim through it.
    from issuance.shared.wire.messages import MemberRegistered
    from issuance.workers.lifecycle import handle_member_registered

    handle_member_registered(pool, settings, MemberRegistered(phone=number, registered_at=utcnow()))
    buyer = one(settings, "SELECT member_id FROM members")
    share_order = place(pool, buyer, activity=act["slug"])
    move(pool, share_order.order_id, "paid")  # only a paid order's share earns rebates
    from tests.integration.lifecycle_support import share_of

    friends = [
        member_with_package(pool, settings, act["slug"], share_id=share_of(share_order)) for _ in range(2)
    ]
    (m1, (c1,), _), (m2, (c2,), _) = friends
    o1 = place(pool, m1, amount=20_000, codes=(c1,))
    move(pool, o1.order_id, "paid")
    place(pool, m2, amount=10_000, codes=(c2,))  # placed, never paid: no sale
    handle_claim(pool, settings, claim(act["slug"], "12345"))  # refused
    report = json.loads(issuance(service_env, "report", "--activity", act["slug"], "--json").stdout)
    assert report["packages_offered"] == 10 and report["packages_claimed"] == 2
    assert report["packages_remaining"] == 8 and report["collect_rate"] == 0.2
    assert report["coupons_claimed"] == 2 and report["coupons_used"] == 2 and report["usage_rate"] == 1.0
    assert report["total_discount_cents"] == 1000
    # Sales count paid, unrefunded orders only (issue 16 item 7).
    assert report["orders_with_coupon"] == 1 and report["sales_with_coupon_cents"] == 20_000
    assert report["cost_effectiveness"] == 20.0 and report["average_order_with_coupon_cents"] == 20_000
    assert report["new_members"] == 2 and report["claims_requested"] == 3 and report["claims_refused"] == 1
    assert report["claims_credited"] == 2 and report["referrals"] == 1 and report["rebates_earned"] == 1
    assert report["rebate_amount_cents"] == 300
    assert report["templates"][0]["available"] == 18 and report["templates"][0]["used"] == 2
    table = issuance(service_env, "report", "--activity", act["slug"]).stdout
    assert "collect rate" in table and "20.0%" in table
    verify_clean(settings)
    # The friend refunds: no sale any more, the referral is reversed, and the
    # rebate already paid (an amount) is flagged for review, in the report.
    move(pool, o1.order_id, "refunded")
    after = json.loads(issuance(service_env, "report", "--activity", act["slug"], "--json").stdout)
    assert (after["orders_with_coupon"], after["sales_with_coupon_cents"]) == (0, 0)
    assert (after["referrals"], after["referrals_reversed"]) == (0, 1)
    assert (after["rebates_earned"], after["rebates_clawed_back"], after["rebates_for_review"]) == (0, 0, 1)
    table = issuance(service_env, "report", "--activity", act["slug"]).stdout
    assert "referrals reversed / rebates clawed back / for review" in table
    verify_clean(settings)


def test_a_channel_report_sums_its_activities(settings, pool, service_env):
    first = activity_with(settings, budget=4, codes=5)
    second = activity_with(settings, budget=6, codes=5)
    for slug, n in ((first["slug"], 1), (second["slug"], 3)):
        for _ in range(n):
            member, (code,), _ = member_with_package(pool, settings, slug)
    order = place(pool, member, amount=8_000, codes=(code,))
    move(pool, order.order_id, "paid")
    report = json.loads(issuance(service_env, "report", "--channel", "test", "--json").stdout)
    assert (report["packages_offered"], report["packages_claimed"], report["packages_remaining"]) == (
        10,
        4,
        6,
    )
    assert report["collect_rate"] == 0.4 and report["coupons_used"] == 1 and report["usage_rate"] == 0.25
    assert report["total_discount_cents"] == 500 and report["cost_effectiveness"] == 16.0
    assert len(report["templates"]) == 2
    missing = issuance(service_env, "report", "--channel", "nowhere", check=False)
    assert missing.returncode == 2 and "no activity on channel" in missing.stderr


def test_the_coupon_commands_sweep_and_cancel(settings, pool, service_env):
    act = activity_with(settings, budget=5, codes=5)
    _, (old,), _ = member_with_package(pool, settings, act["slug"])
    _, (fresh,), _ = member_with_package(pool, settings, act["slug"])
    with psycopg.connect(settings.database_url) as conn:
        conn.execute("UPDATE codes SET expires_at = now() - interval '1 second' WHERE code = %s", (old,))
    assert issuance(service_env, "coupons", "expire").stdout.strip() == "expired 1 coupons"
    assert issuance(service_env, "coupons", "expire").stdout.strip() == "expired 0 coupons"
    assert "cancelled" in issuance(service_env, "coupons", "cancel", fresh).stdout
    refused = issuance(service_env, "coupons", "cancel", old, check=False)
    assert refused.returncode == 2 and "the coupon has expired" in refused.stderr
    assert one(settings, "SELECT status FROM codes WHERE code = %s", fresh) == "cancelled"
    verify_clean(settings)


def test_a_bulk_batch_refreshes_the_pools_statistics_and_allocation_stays_on_the_pool_index(settings):
    first, second = prefix(), prefix()
    activity_with(
        settings,
        codes=0,
        templates=[{"prefix": p, "kind": "gift", "value": 1} for p in (first, second)],
    )
    with session(settings) as s, s.begin():
        catalog.generate_codes(s, first, 30_000)
    # The second template's codes arrive after statistics that knew only the
    # first's: the refresh (a small sample of the pool's two columns) must
    # show them to the planner, and leave the session's sample size as it was.
    shown = "SELECT current_setting('default_statistics_target'), current_setting('work_mem')"
    with session(settings) as s, s.begin():
        before = s.connection().exec_driver_sql(shown).one()
        batch = catalog.generate_codes(s, second, 40_000)
        after = s.connection().exec_driver_sql(shown).one()
    assert after == before, "the sample size and work_mem are set back within the transaction"
    template = one(settings, "SELECT template_id FROM code_batches WHERE batch_id = %s", batch.batch_id)
    with psycopg.connect(settings.database_url) as conn:
        common = conn.execute(
            "SELECT most_common_vals::text::int[] FROM pg_stats"
            " WHERE tablename = 'codes' AND attname = 'template_id'"
        ).fetchone()
        plan = "\n".join(
            r[0]
            for r in conn.execute(
                "EXPLAIN " + store.FREE_CODES.format(skip="SKIP LOCKED"), (template, 0, [], 50)
            ).fetchall()
        )
    assert "codes_available_idx" in plan and "Sort" not in plan, plan
    assert common is not None and template in common[0]
