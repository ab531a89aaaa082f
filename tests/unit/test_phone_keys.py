"""Phone keys with IDs (ISSUANCE_PHONE_KEY, ISSUANCE_PHONE_KEYS, ISSUANCE_PHONE_KEY_ID)."""

from __future__ import annotations

import pytest
from issuance.shared.domain import phone_digest, phone_digests
from issuance.shared.settings import PhoneKeyError, require_phone_keys, settings_from

OLD, NEW = "old-phone-key-0123456789", "new-phone-key-0123456789"


def keys(**env: str) -> tuple[str, tuple[str, ...]]:
    found = require_phone_keys(settings_from({f"ISSUANCE_{k.upper()}": v for k, v in env.items()}))
    return found.current_id, found.ids


def test_the_single_key_is_id_1_and_every_step_of_a_rotation_reads() -> None:
    assert keys(phone_key=OLD) == ("1", ("1",))
    assert keys(phone_key=OLD, phone_keys=f"2:{NEW}") == ("1", ("1", "2"))
    assert keys(phone_key=OLD, phone_keys=f"2:{NEW}", phone_key_id="2") == ("2", ("2", "1"))
    assert keys(phone_keys=f"2:{NEW}") == ("2", ("2",))
    assert keys(phone_keys=f"1:{OLD}, 2:{NEW}", phone_key_id="2") == ("2", ("2", "1"))


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({}, "ISSUANCE_PHONE_KEY is not set"),
        ({"phone_keys": f"2:{NEW},3:{OLD}"}, "ISSUANCE_PHONE_KEY_ID is ''"),
        ({"phone_keys": f"2:{NEW}", "phone_key_id": "3"}, "must name one of the phone keys"),
        ({"phone_keys": f"2:{NEW},2:{OLD}", "phone_key_id": "2"}, "lists key ID '2' twice"),
        ({"phone_key": OLD, "phone_keys": f"1:{NEW}"}, "both ISSUANCE_PHONE_KEY and an entry"),
        ({"phone_keys": "2:short"}, "entry '2' is 5 bytes long"),
        ({"phone_keys": "2:please-change-me-now-123"}, "entry '2' is a placeholder"),
        ({"phone_keys": NEW}, "lists 'kid:secret' entries"),
        ({"phone_keys": f"a b:{NEW}"}, "lists 'kid:secret' entries"),
    ],
)
def test_an_unusable_key_set_is_one_line(env: dict[str, str], says: str) -> None:
    with pytest.raises(PhoneKeyError, match=says) as raised:
        keys(**env)
    assert "\n" not in str(raised.value) and NEW not in str(raised.value)


def test_digests_come_current_first() -> None:
    found = require_phone_keys(settings_from({"ISSUANCE_PHONE_KEY": OLD, "ISSUANCE_PHONE_KEYS": f"2:{NEW}"}))
    assert phone_digests("+8613800138000", found.secrets) == [
        ("1", phone_digest("+8613800138000", OLD)),
        ("2", phone_digest("+8613800138000", NEW)),
    ]
