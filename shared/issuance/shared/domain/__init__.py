"""The business rules of DOMAIN.md as plain functions.

This module must not import database, broker, cache, network or metrics code
(a unit test checks it): everything here is decided from values.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
import hmac
import math
import re
import secrets
import uuid
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import phonenumbers

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

# Codes use an alphabet without look-alikes (no 0/O, 1/I): 32 symbols,
# exactly 5 bits each.
CODE_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZ"
CODE_MIN_LENGTH = 10
CODE_MAX_LENGTH = 16
DEFAULT_CODE_RANDOM_BITS = 64
# The documented floor: fewer random bits make codes guessable by a script.
MIN_CODE_RANDOM_BITS = 64

# Share IDs are derived from order IDs, so the order system can build the link
# itself and a replayed order-placed opens the same share.
SHARE_NAMESPACE = uuid.UUID("6f1c51a4-2d55-4bd3-9a51-3c1f0f5ad2a1")


class Refusal(enum.StrEnum):
    """Why a claim was refused. The values are stable: they are stored and
    shown to the activity page."""

    BAD_PHONE = "bad_phone"
    ALREADY_RECEIVED = "already_received"
    SIMILAR_ACTIVITY = "similar_activity"
    NOT_STARTED = "not_started"
    ENDED = "ended"
    SOLD_OUT = "sold_out"
    POOL_EMPTY = "pool_empty"
    UNKNOWN_ACTIVITY = "unknown_activity"
    OUTSIDE_REGION = "outside_region"

    @property
    def text(self) -> str:
        """The sentence a member reads."""
        return REFUSAL_TEXT[self]


REFUSAL_TEXT: dict[Refusal, str] = {
    Refusal.BAD_PHONE: "please enter a correct mobile number",
    Refusal.ALREADY_RECEIVED: "you have already received this package",
    Refusal.SIMILAR_ACTIVITY: "you have taken part in a similar activity, please check your coupons",
    Refusal.NOT_STARTED: "this activity has not started yet",
    Refusal.ENDED: "this activity has ended",
    Refusal.SOLD_OUT: "all packages are gone",
    Refusal.POOL_EMPTY: "all packages are gone",
    Refusal.UNKNOWN_ACTIVITY: "this activity does not exist",
    Refusal.OUTSIDE_REGION: "this activity is open only to mobile numbers from some cities or provinces",
}


class InvalidPhone(ValueError):
    """The text is not a valid mobile number."""


def normalize_phone(raw: str, default_region: str) -> str:
    """Parse a mobile number as typed and return it in E.164 form.

    Raises :class:`InvalidPhone` for anything that is not a valid mobile (or
    fixed-or-mobile) number. A number already in E.164 form (the page sends
    them so) is checked without a second parse when that gives the same
    answer; anything else takes the full parse.
    """
    if not isinstance(raw, str) or not 3 <= len(raw) <= 32:
        raise InvalidPhone(Refusal.BAD_PHONE.text)
    if raw.startswith("+") and (e164 := _valid_e164(raw)) is not None:
        return e164
    return _parse_phone(raw, default_region)


_MOBILE_TYPES = (phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE)


def _parse_phone(raw: str, default_region: str) -> str:
    try:
        parsed = phonenumbers.parse(raw, default_region)
    except phonenumbers.NumberParseException:
        raise InvalidPhone(Refusal.BAD_PHONE.text) from None
    # A number of one of these types is valid (is_valid_number would ask
    # the same metadata the same question a second time).
    if phonenumbers.number_type(parsed) not in _MOBILE_TYPES:
        raise InvalidPhone(Refusal.BAD_PHONE.text)
    return str(phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164))


_E164 = re.compile(r"\+([1-9][0-9]{6,14})")


def _valid_e164(raw: str) -> str | None:
    """``raw`` when it is a valid mobile number in exact E.164 form and the
    full parse would read it as the same number; None when only the full
    parse can tell (also for every number it would refuse)."""
    match = _E164.fullmatch(raw)
    if match is None:
        return None
    digits = match.group(1)
    # Country codes are prefix-free: the first 1-3 digits that are one.
    size = next((n for n in (1, 2, 3) if int(digits[:n]) in phonenumbers.COUNTRY_CODE_TO_REGION_CODE), 0)
    national = digits[size:]
    region = phonenumbers.region_code_for_country_code(int(digits[:size])) if size else None
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region) if region else None
    # The parse strips a national prefix or carrier code where the number
    # starts like one, and keeps leading zeros apart: leave those to it.
    if metadata is None or not national or national.startswith("0"):
        return None
    strip = metadata.national_prefix_for_parsing or metadata.national_prefix
    if strip and re.match(strip, national):
        return None
    number = phonenumbers.PhoneNumber(country_code=int(digits[:size]), national_number=int(national))
    return raw if phonenumbers.number_type(number) in _MOBILE_TYPES else None


def phone_digest(e164: str, key: str) -> bytes:
    """The keyed hash a number is looked up by (HMAC-SHA256)."""
    return hmac.new(key.encode(), e164.encode(), hashlib.sha256).digest()


def phone_digests(e164: str, keys: Sequence[tuple[str, str]]) -> list[tuple[str, bytes]]:
    """(key ID, digest) of a number under each (key ID, secret), in order:
    during a key rotation a member may still be stored under an older key."""
    return [(kid, phone_digest(e164, secret)) for kid, secret in keys]


def mask_phone(number: str) -> str:
    """A number as it may appear in logs, dead letters and screens, whatever
    its typing: ``+86138******00`` for ``+8613800138000``.

    At least half of the national number's digits are hidden, for every
    length: the country code (after a ``+``), at most 3 leading and 2
    trailing digits stay, everything else becomes ``*``. Separators are
    dropped; text without a digit is hidden whole.
    """
    digits = _NOT_DIGIT.sub("", number)
    if not digits:
        return "*" * len(number)
    plus = number.lstrip()[:1] == "+"
    country = _country_code(digits) if plus else ""
    national = digits[len(country) :]
    shown = len(national) // 2  # hide the larger half
    tail = min(2, shown // 2)
    head = min(3, shown - tail)
    hidden = len(national) - head - tail
    return f"{'+' if plus else ''}{country}{national[:head]}{'*' * hidden}{national[len(national) - tail :]}"


def redact_payload(payload: Any) -> Any:
    """A message payload as it may be stored or logged: every phone number
    masked, also those of the claims inside a batch (claims-requested)."""
    if not isinstance(payload, dict):
        return payload
    masked = dict(payload)
    if isinstance(masked.get("phone"), str):
        masked["phone"] = mask_phone(masked["phone"])
    if isinstance(masked.get("claims"), list):
        masked["claims"] = [redact_payload(item) for item in masked["claims"]]
    return masked


_NOT_DIGIT = re.compile(r"[^0-9]")
_CALLING_CODES = frozenset(str(code) for code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE)


def _country_code(digits: str) -> str:
    """The calling code an international number starts with (codes are
    prefix-free, 1 to 3 digits); empty for an unassigned one."""
    return next((digits[:n] for n in (1, 2, 3) if digits[:n] in _CALLING_CODES), "")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ActivityRules:
    """What the claim rules need to know about an activity."""

    online: bool
    starts_at: datetime
    ends_at: datetime


def window_refusal(rules: ActivityRules, at: datetime) -> Refusal | None:
    """Refuse claims outside the activity's window, or while it is offline."""
    if not rules.online:
        return Refusal.ENDED
    if at < rules.starts_at:
        return Refusal.NOT_STARTED
    if at >= rules.ends_at:
        return Refusal.ENDED
    return None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TemplateRef:
    """A coupon template, as far as binding needs it."""

    template_id: int
    new_user_only: bool


# How long after registering in the app a member still counts as a new
# user: new to the app, not only to this pipeline.
NEW_USER_WINDOW = timedelta(days=30)


def is_new_user(*, holds_packages: bool, registered_at: datetime | None, at: datetime) -> bool:
    """Is a number claiming at ``at`` a new user? Not when it already holds
    a package, nor when its member registered in the app more than
    :data:`NEW_USER_WINDOW` before (a member of long standing claiming here
    for the first time is not new)."""
    if holds_packages:
        return False
    return registered_at is None or at - registered_at < NEW_USER_WINDOW


def templates_to_bind(templates: Sequence[TemplateRef], *, new_member: bool) -> list[TemplateRef]:
    """One code per template of the package; new-user-exclusive templates
    only when the number claims for the first time on the platform."""
    return [t for t in templates if new_member or not t.new_user_only]


def coupon_expiry(
    claimed_at: datetime,
    *,
    zone: str,
    validity_days: int | None,
    valid_until: datetime | None,
) -> datetime:
    """When a coupon claimed at ``claimed_at`` expires.

    With ``validity_days`` N: at 24:00 (the end) of claim-date + N days in the
    activity's time zone, but never after ``valid_until`` when the activity
    sets both ("N days, but not after date D"). Otherwise the fixed window's
    end.
    """
    if validity_days is not None:
        if type(validity_days) is not int or validity_days < 0:
            raise ValueError(f"validity_days must be a whole number of days, not {validity_days!r}")
        tz = ZoneInfo(zone)
        claim_date: date = claimed_at.astimezone(tz).date()
        end_day = claim_date + timedelta(days=validity_days + 1)
        end = datetime.combine(end_day, time(0), tzinfo=tz).astimezone(UTC)
        return end if valid_until is None else min(end, valid_until)
    if valid_until is None:
        raise ValueError("an activity needs validity_days or a fixed validity window")
    return valid_until


def credit_deadline(claimed_at: datetime, promise_seconds: int) -> datetime:
    """The promise printed on the page: credited within 24 hours of the claim."""
    return claimed_at + timedelta(seconds=promise_seconds)


def share_id_for(order_id: str) -> uuid.UUID:
    """The share (red envelope) opened for an order."""
    return uuid.uuid5(SHARE_NAMESPACE, order_id)


def random_length(bits: int) -> int:
    """How many alphabet symbols carry at least ``bits`` of randomness."""
    return math.ceil(bits / math.log2(len(CODE_ALPHABET)))


def validate_prefix(prefix: str, bits: int = DEFAULT_CODE_RANDOM_BITS) -> None:
    """A prefix uses the code alphabet and leaves room for the random part."""
    if not prefix or any(c not in CODE_ALPHABET for c in prefix):
        raise ValueError(f"prefix {prefix!r} must use only {CODE_ALPHABET}")
    total = len(prefix) + random_length(bits)
    if not CODE_MIN_LENGTH <= total <= CODE_MAX_LENGTH:
        raise ValueError(
            f"prefix {prefix!r} with {bits} random bits makes {total}-character codes;"
            f" codes must be {CODE_MIN_LENGTH} to {CODE_MAX_LENGTH} characters"
        )


def keyspace(bits: int = DEFAULT_CODE_RANDOM_BITS) -> int:
    """How many distinct codes one prefix can hold."""
    return int(len(CODE_ALPHABET) ** random_length(bits))


# base32 maps 5 random bits to one of 32 symbols; translating its alphabet to
# ours keeps every symbol uniformly random and costs one C call per batch.
_B32_TO_CODE = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", CODE_ALPHABET.encode())


def new_codes(prefix: str, count: int, bits: int = DEFAULT_CODE_RANDOM_BITS) -> list[str]:
    """``count`` codes: the prefix, then symbols from the OS CSPRNG."""
    length = random_length(bits)
    chunk = 16  # base32 of 10 bytes: 16 symbols, 80 bits
    if length > chunk:
        raise ValueError(f"at most {chunk * 5} random bits per code")
    symbols = base64.b32encode(secrets.token_bytes(10 * count)).translate(_B32_TO_CODE).decode()
    return [prefix + symbols[i : i + length] for i in range(0, chunk * count, chunk)]


# How many leading symbols of a code a 64-bit sort key holds.
_KEY_SYMBOLS = 12


def sorted_code_block(prefix: str, count: int, bits: int = DEFAULT_CODE_RANDOM_BITS) -> npt.NDArray[np.uint8]:
    """``count`` codes as the rows of a byte matrix (one ASCII code a row),
    in ascending order: the prefix, then symbols from the OS CSPRNG.

    The first twelve symbols (60 bits) come from one random 64-bit integer
    per code, sorted as numbers: a code's symbols are its key's base-32
    digits, most significant first, in an alphabet whose order is that of
    its ASCII bytes, so sorting the keys sorts the codes and costs no
    comparison of text. Each further symbol is five more random bits.
    Every symbol stays uniformly random; no per-code Python object is made.
    (numpy is imported here: only the back office's batches need it.)"""
    import numpy as np

    alphabet = np.frombuffer(CODE_ALPHABET.encode(), dtype=np.uint8)
    length = random_length(bits)
    if length > 16:
        raise ValueError("at most 80 random bits per code")
    head = min(length, _KEY_SYMBOLS)
    keys = np.frombuffer(secrets.token_bytes(8 * count), dtype=np.uint64) >> np.uint64(64 - 5 * head)
    keys = np.sort(keys)
    block = np.empty((count, len(prefix) + length), dtype=np.uint8)
    block[:, : len(prefix)] = np.frombuffer(prefix.encode(), dtype=np.uint8)
    for digit in range(head):  # one column at a time: no count x head matrix of 64-bit words
        shift = np.uint64(5 * (head - 1 - digit))
        block[:, len(prefix) + digit] = alphabet[((keys >> shift) & np.uint64(31)).astype(np.uint8)]
    if length > head:
        tail = np.frombuffer(secrets.token_bytes(count * (length - head)), dtype=np.uint8) & np.uint8(31)
        block[:, len(prefix) + head :] = alphabet[tail.reshape(count, length - head)]
    return block


assert "".join(sorted(CODE_ALPHABET)) == CODE_ALPHABET, "symbol order is byte order"


# Random codes stay unguessable and cheap to generate only while the pool
# uses a sliver of the keyspace.
MAX_KEYSPACE_FRACTION = 1e-6


def check_capacity(prefix: str, existing: int, requested: int, bits: int = DEFAULT_CODE_RANDOM_BITS) -> None:
    """Refuse a batch that cannot be unique (or would make codes guessable)."""
    validate_prefix(prefix, bits)
    limit = int(keyspace(bits) * MAX_KEYSPACE_FRACTION)
    if requested < 1:
        raise ValueError("a batch needs at least one code")
    if existing + requested > limit:
        raise ValueError(
            f"{existing + requested} codes under {prefix!r} exceed {limit}, the most a keyspace of"
            f" {keyspace(bits):.3g} holds while a guess stays under one in a million; use more random bits"
        )
    if bits < MIN_CODE_RANDOM_BITS:
        raise ValueError(
            f"{bits} random bits per code is below the minimum of {MIN_CODE_RANDOM_BITS};"
            " use more random bits"
        )
