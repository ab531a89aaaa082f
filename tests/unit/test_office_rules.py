"""The back office's pure parts: the approval rule, where a catalog message
is shown on the activity form, and the form's round trip."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from issuance.shared.backoffice import catalog
from issuance.shared.backoffice.web import forms
from issuance.shared.backoffice.web.approvals import needs_approval


@pytest.mark.parametrize(
    ("budget", "approved", "threshold", "waits"),
    [
        (100, None, 1000, False),
        (1000, None, 1000, False),
        (1001, None, 1000, True),
        (5000, 5000, 1000, False),
        (5001, 5000, 1000, True),
        (900, 5000, 1000, False),
    ],
)
def test_a_budget_waits_above_the_threshold_and_the_approved_budget(budget, approved, threshold, waits):
    assert needs_approval(budget, approved, threshold) is waits


def spec(**overrides) -> catalog.ActivitySpec:
    values = {
        "slug": "spring",
        "title": "Spring",
        "channel": "app",
        "starts_at": datetime(2026, 3, 1, 1, 2, 3, 456789, tzinfo=UTC),
        "ends_at": datetime(2026, 3, 8, tzinfo=UTC),
        "budget": 10,
        "templates": [{"prefix": "SPR", "kind": "amount_off", "value": 500}],
        "timezone": "Asia/Shanghai",
    }
    values.update(overrides)
    return catalog.ActivitySpec.from_mapping(values)


def test_the_form_shows_times_in_the_activitys_zone_and_reads_them_back():
    shown = forms.render(spec())
    assert shown["starts_at"] == "2026-03-01T09:02:03"
    parsed = forms.parse(shown)
    assert parsed.errors == {}
    assert parsed.values["ends_at"] == datetime(2026, 3, 8, tzinfo=UTC)
    assert parsed.values["templates"] == [
        {
            "prefix": "SPR",
            "kind": "amount_off",
            "value": 500,
            "threshold_cents": 0,
            "new_user_only": False,
            "title": "",
        }
    ]


def test_an_untouched_form_changes_nothing_and_an_edit_changes_only_its_field():
    current = forms.render(spec())
    assert forms.changes(forms.parse(current), current) == {}
    edited = dict(current, title="Spring sale", t0_value="600")
    changes = forms.changes(forms.parse(edited), current)
    assert set(changes) == {"title", "templates"}
    assert changes["templates"][0]["value"] == 600


def test_what_is_not_a_number_or_a_date_is_refused_by_field():
    shown = dict(forms.render(spec()), budget="ten", ends_at="soon", t1_prefix="XYZ", t1_value="1.5")
    assert forms.parse(shown).errors == {
        "budget": "enter a whole number",
        "ends_at": "enter a date and time (YYYY-MM-DD HH:MM)",
        "t1_value": "enter a whole number",
    }


def catalog_message(**overrides) -> str:
    with pytest.raises(catalog.BackOfficeError) as refused:
        spec(**overrides).check()
    return str(refused.value)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"slug": "No"}, "slug"),
        ({"ends_at": datetime(2026, 1, 1, tzinfo=UTC)}, "ends_at"),
        ({"budget": -1}, "budget"),
        ({"templates": []}, "templates"),
        ({"templates": [{"prefix": "S0", "kind": "amount_off", "value": 1}]}, "templates"),
        ({"templates": [{"prefix": "SPR", "kind": "voucher", "value": 1}]}, "templates"),
        ({"timezone": "Nowhere/City"}, "timezone"),
        ({"validity_days": None}, "validity_days"),
        ({"rebate_every": 0}, "rebate_every"),
        ({"rebate_amount_cents": -5}, "rebate_amount_cents"),
        ({"rebate_amount_cents": 5, "rebate_template": "ABC"}, "rebate_amount_cents"),
    ],
)
def test_each_catalog_refusal_is_shown_on_its_field(overrides, field):
    assert forms.field_of(catalog_message(**overrides)) == field


def test_a_refusal_of_a_live_edit_names_its_field():
    message = "spring has 3 packages issued; cannot change validity_days: issued coupons carry expiries"
    assert forms.field_of(message) == "validity_days"
    assert forms.field_of("something nobody expected") == ""


def test_a_new_activitys_form_starts_from_the_specs_defaults():
    shown = forms.render(None)
    assert shown["timezone"] == "Asia/Shanghai" and shown["online"] == "on" and shown["validity_days"] == "7"
    assert forms.parse(dict(shown, starts_at="2026-01-01T00:00:00")).values["starts_at"] == datetime(
        2026, 1, 1, tzinfo=UTC
    ) + timedelta(hours=-8)
