"""The pure rules of issuance.shared.domain."""

from __future__ import annotations

import ast
import collections
import contextlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from issuance.shared import domain
from issuance.shared.domain import ActivityRules, Refusal, TemplateRef


def test_numbers_are_normalised_to_e164_whatever_the_typing():
    for typed in ("13800138000", "138 0013 8000", "+86 138-0013-8000", "+8613800138000"):
        assert domain.normalize_phone(typed, "CN") == "+8613800138000"


@pytest.mark.parametrize("typed", ["", "12345", "abc", "+86138", "+861380013800099999", "010 1234 5678x"])
def test_invalid_numbers_are_refused_with_the_domain_sentence(typed):
    with pytest.raises(domain.InvalidPhone, match="please enter a correct mobile number"):
        domain.normalize_phone(typed, "CN")


def test_a_fixed_line_is_not_a_mobile_number():
    with pytest.raises(domain.InvalidPhone):
        domain.normalize_phone("010 6552 9988", "CN")


@given(st.text(max_size=40))
def test_normalisation_never_crashes(text):
    with contextlib.suppress(domain.InvalidPhone):
        assert domain.normalize_phone(text, "CN").startswith("+")


def test_digests_are_keyed_and_masks_hide_the_middle():
    number = "+8613800138000"
    assert domain.phone_digest(number, "a") != domain.phone_digest(number, "b")
    assert len(domain.phone_digest(number, "a")) == 32
    masked = domain.mask_phone(number)
    assert masked == "+86138******00"  # 6 of the 11 national digits hidden


def test_window():
    start = datetime(2026, 11, 11, tzinfo=UTC)
    rules = ActivityRules(online=True, starts_at=start, ends_at=start + timedelta(days=1))
    assert domain.window_refusal(rules, start - timedelta(seconds=1)) is Refusal.NOT_STARTED
    assert domain.window_refusal(rules, start) is None
    assert domain.window_refusal(rules, start + timedelta(days=1)) is Refusal.ENDED
    offline = ActivityRules(online=False, starts_at=start, ends_at=start + timedelta(days=1))
    assert domain.window_refusal(offline, start + timedelta(hours=1)) is Refusal.ENDED


def test_every_refusal_has_a_sentence():
    assert set(domain.REFUSAL_TEXT) == set(Refusal)
    assert Refusal.ALREADY_RECEIVED.text == "you have already received this package"


def test_expiry_is_end_of_claim_day_plus_n_in_the_activity_zone():
    # 23:30 in Shanghai on 11 Nov is 15:30 UTC; 7 days later ends at 24:00 on 18 Nov Shanghai time.
    claimed = datetime(2026, 11, 11, 15, 30, tzinfo=UTC)
    expiry = domain.coupon_expiry(claimed, zone="Asia/Shanghai", validity_days=7, valid_until=None)
    assert expiry == datetime(2026, 11, 18, 16, 0, tzinfo=UTC)
    # Half an hour later it is already 12 Nov in Shanghai.
    later = domain.coupon_expiry(
        claimed + timedelta(minutes=30), zone="Asia/Shanghai", validity_days=7, valid_until=None
    )
    assert later == datetime(2026, 11, 19, 16, 0, tzinfo=UTC)
    fixed = datetime(2026, 12, 31, tzinfo=UTC)
    assert domain.coupon_expiry(claimed, zone="UTC", validity_days=None, valid_until=fixed) == fixed


def test_new_user_templates_are_dropped_for_returning_members():
    templates = [
        TemplateRef(template_id=1, new_user_only=False),
        TemplateRef(template_id=2, new_user_only=True),
    ]
    assert [t.template_id for t in domain.templates_to_bind(templates, new_member=True)] == [1, 2]
    assert [t.template_id for t in domain.templates_to_bind(templates, new_member=False)] == [1]


def test_codes_are_prefixed_random_and_from_the_alphabet():
    codes = domain.new_codes("RX", 10_000)
    assert len(set(codes)) == 10_000
    assert all(c.startswith("RX") and len(c) == 15 for c in codes)
    assert set("".join(c[2:] for c in codes)) == set(domain.CODE_ALPHABET)
    assert not set("01IO") & set(domain.CODE_ALPHABET)
    assert domain.random_length(64) * 5 >= 64


@pytest.mark.parametrize(("bits", "length"), [(35, 7), (64, 13), (80, 16)])
def test_a_code_block_is_sorted_prefixed_and_uniform_in_every_position(bits, length):
    block = domain.sorted_code_block("RX", 40_000, bits)
    codes = [bytes(row).decode() for row in block]
    assert block.shape == (40_000, 2 + length)
    assert codes == sorted(codes), "rows come in ascending order"
    assert len(set(codes)) == 40_000
    assert all(c.startswith("RX") for c in codes)
    # Each position, the sort key's first and last digits and the extra
    # symbols past it, uses all 32 symbols evenly (about 1,250 each).
    for position in range(2, 2 + length):
        counts = collections.Counter(c[position] for c in codes)
        assert set(counts) == set(domain.CODE_ALPHABET), position
        assert max(counts.values()) / min(counts.values()) < 1.4, (position, counts)


def test_capacity_and_prefix_checks():
    with pytest.raises(ValueError, match="must use only"):
        domain.validate_prefix("R0")
    with pytest.raises(ValueError, match="codes must be 10 to 16"):
        domain.validate_prefix("ABCDEFG")
    with pytest.raises(ValueError, match="exceed"):
        domain.check_capacity("RX", 0, 10**15)
    domain.check_capacity("RX", 0, 10_000_000)


def test_share_ids_are_stable_per_order():
    assert domain.share_id_for("SO-1") == domain.share_id_for("SO-1") != domain.share_id_for("SO-2")


def test_the_domain_imports_no_infrastructure():
    forbidden = {"sqlalchemy", "psycopg", "psycopg_pool", "pika", "redis", "dramatiq", "prometheus_client"}
    tree = ast.parse(Path(domain.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & forbidden


@settings(max_examples=2000, deadline=None)
@given(text=st.from_regex(r"\A\+?(86|1|44|852|91)?1[0-9]{5,11}\Z") | st.from_regex(r"\A\+?[0-9 ]{3,20}\Z"))
def test_a_number_is_accepted_exactly_when_it_is_a_valid_mobile_number(text):
    import phonenumbers

    try:
        parsed = phonenumbers.parse(text, "CN")
    except phonenumbers.NumberParseException:
        expected = None
    else:
        mobile = phonenumbers.number_type(parsed) in (
            phonenumbers.PhoneNumberType.MOBILE,
            phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE,
        )
        valid = phonenumbers.is_valid_number(parsed) and mobile
        expected = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164) if valid else None
    try:
        got = domain.normalize_phone(text, "CN")
    except domain.InvalidPhone:
        got = None
    assert got == expected


@pytest.mark.parametrize("bits", [40, 63])
def test_fewer_random_bits_than_the_documented_minimum_are_refused(bits: int) -> None:
    with pytest.raises(ValueError, match="below the minimum of 64"):
        domain.check_capacity("RX", 0, 10, bits)
    domain.check_capacity("RX", 0, 10, 64)
