"""Numbers already in E.164 form skip the second parse only where that
gives the full parse's answer: the same number, or the same refusal."""

from __future__ import annotations

import random

import phonenumbers
import pytest
from issuance.shared.domain import InvalidPhone, _parse_phone, _valid_e164, normalize_phone


def _answer(fn, raw: str) -> str:
    try:
        return fn(raw, "CN")
    except InvalidPhone:
        return "refused"


def _numbers() -> list[str]:
    """Example numbers of every region and type, in E.164, and near misses
    of each: last digit changed, a digit more, a digit less, a zero or the
    national prefix after the country code."""
    rng = random.Random(15)
    found = set()
    for region in phonenumbers.SUPPORTED_REGIONS:
        metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)
        for kind in (
            phonenumbers.PhoneNumberType.MOBILE,
            phonenumbers.PhoneNumberType.FIXED_LINE,
            phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE,
            phonenumbers.PhoneNumberType.TOLL_FREE,
            phonenumbers.PhoneNumberType.VOIP,
        ):
            example = phonenumbers.example_number_for_type(region, kind)
            if example is None:
                continue
            e164 = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164)
            cc = str(example.country_code)
            national = e164[1 + len(cc) :]
            found.update(
                {
                    e164,
                    e164[:-1] + str(rng.randrange(10)),
                    e164 + str(rng.randrange(10)),
                    e164[:-1],
                    f"+{cc}0{national}",
                    f"+{cc}{metadata.national_prefix or '8'}{national}",
                }
            )
    found.update(f"+86{rng.randrange(10**10, 10**11)}" for _ in range(2000))
    found.update(f"+{rng.randrange(10**7, 10**15)}" for _ in range(2000))
    return sorted(found)


def test_the_fast_path_gives_the_full_parse_answer_for_every_number():
    numbers = _numbers()
    differ = [n for n in numbers if _answer(normalize_phone, n) != _answer(_parse_phone, n)]
    assert differ == []
    # And it does take most valid mobile numbers: it is a fast path, not a no-op.
    mobiles = [n for n in numbers if n.startswith("+86") and _answer(_parse_phone, n) != "refused"]
    assert len(mobiles) > 100
    assert sum(_valid_e164(n) is not None for n in mobiles) > 0.9 * len(mobiles)


@pytest.mark.parametrize("raw", ["+8600000000000", "+861380013800", "+86138001380001", "+0013800138000"])
def test_a_bad_number_in_e164_form_is_still_refused(raw):
    with pytest.raises(InvalidPhone):
        normalize_phone(raw, "CN")
