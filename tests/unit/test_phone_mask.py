"""One phone mask (issuance.shared.domain.mask_phone) for logs, dead letters
and the members table: it hides at least half of every number."""

from __future__ import annotations

import math
import re

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from issuance.shared.domain import mask_phone
from issuance.shared.domain import redact_payload as redact
from issuance.workers.redaction import redact_text

e164_numbers = st.from_regex(r"\A\+[1-9][0-9]{7,14}\Z")


def country_code(e164: str) -> str:
    try:
        return str(phonenumbers.parse(e164).country_code)
    except phonenumbers.NumberParseException:  # no such calling code: every digit is national
        return ""


@settings(max_examples=1000, deadline=None)
@given(e164_numbers)
def test_at_least_half_of_the_national_number_is_hidden_whatever_the_number(e164):
    cc = country_code(e164)
    national = e164[1 + len(cc) :]
    masked = mask_phone(e164)
    assert masked.startswith("+" + cc)
    assert len(masked) == len(e164)
    hidden = masked.count("*")
    assert hidden >= math.ceil(len(national) / 2)
    # What stays in clear is the head and the tail of the national number.
    shown = re.fullmatch(r"(\d*)\*+(\d*)", masked[1 + len(cc) :])
    assert shown is not None
    head, tail = shown.groups()
    assert national.startswith(head) and national.endswith(tail)


@pytest.mark.parametrize(
    ("number", "masked"),
    [
        ("+8613800138000", "+86138******00"),
        ("+376312345", "+37631***5"),  # Andorra: six national digits, half of them hidden
        ("+16505551234", "+1650*****34"),
        ("13912345678", "139******78"),
        ("139 1234 5678", "139******78"),
        ("+86 138-0013-8000", "+86138******00"),
        ("not a number", "************"),
    ],
)
def test_masks_of_numbers_as_typed(number, masked):
    assert mask_phone(number) == masked


def test_the_log_filter_and_the_dead_letters_use_the_same_mask():
    assert redact_text("claim for +376312345 refused") == "claim for +37631***5 refused"
    assert redact({"phone": "+376312345"})["phone"] == "+37631***5"
    assert redact_text("{'phone': '139 1234 5678'}") == "{'phone': '139******78'}"
