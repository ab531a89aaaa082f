"""Where a mobile number is from, by its prefix, offline (phonenumbers'
geocoder data ships with the package: no lookup leaves the process), and
whether an activity limited to some cities or provinces is open to it.

An activity names its places as an operator writes them, in English
("Jiangsu", "Changzhou", "Beijing") or in Chinese ("江苏省", "江苏",
"常州市", "北京"); a number matches when its city or its province is one
of them.
"""

from __future__ import annotations

from collections.abc import Iterable

import phonenumbers
from phonenumbers import geocoder

# The units a Chinese description ends its province part with.
_PROVINCE_ENDS = ("自治区", "省")
_SUFFIXES = ("自治区", "自治州", "省", "市")


def places_of(e164: str) -> frozenset[str]:
    """The names of a number's city and province (English and Chinese,
    with and without 省/市), case-folded; empty when the prefix is unknown."""
    number = phonenumbers.parse(e164)
    english = geocoder.description_for_number(number, "en")
    chinese = geocoder.description_for_number(number, "zh")
    names = {part.strip() for part in english.split(",") if part.strip()}
    names |= _chinese_parts(chinese)
    return frozenset(fold(name) for name in names)


def _chinese_parts(text: str) -> set[str]:
    if not text:
        return set()
    parts = {text}
    for end in _PROVINCE_ENDS:
        cut = text.find(end)
        if cut != -1:
            parts |= {text[: cut + len(end)], text[cut + len(end) :]}
            break
    return {short for part in parts if part for short in (part, _without_suffix(part)) if short}


def _without_suffix(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def fold(name: str) -> str:
    return name.strip().casefold()


def outside(regions: Iterable[str], e164: str) -> bool:
    """Is the activity limited to ``regions`` (none: open everywhere) and
    the number from none of them?"""
    wanted = {fold(r) for r in regions}
    return bool(wanted) and not (wanted & places_of(e164))
