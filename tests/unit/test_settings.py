from __future__ import annotations

import pytest
from issuance.shared.settings import PhoneKeyError, Settings, SettingsError, require_phone_key, settings_from


def test_defaults_work_on_a_laptop():
    settings = settings_from({})
    assert settings == Settings()
    assert settings.sqlalchemy_url.startswith("postgresql+psycopg://127.0.0.1:5432/")


def test_environment_overrides_and_types():
    settings = settings_from({"ISSUANCE_WORKER_THREADS": "3", "ISSUANCE_DEFAULT_REGION": "US"})
    assert (settings.worker_threads, settings.default_region) == (3, "US")


def test_bad_values_are_refused_with_the_variable_name():
    with pytest.raises(SettingsError, match="ISSUANCE_WORKER_THREADS"):
        settings_from({"ISSUANCE_WORKER_THREADS": "many"})
    with pytest.raises(SettingsError, match="ISSUANCE_FAULT"):
        settings_from({"ISSUANCE_FAULT": "everywhere"})


def test_retries_must_fit_inside_the_promise():
    with pytest.raises(SettingsError, match="promise"):
        settings_from({"ISSUANCE_MAX_RETRIES": "10000", "ISSUANCE_MAX_BACKOFF_MS": "3600000"})


def test_switches_take_true_or_false_and_refuse_anything_else():
    assert Settings().credit_inline is True
    assert settings_from({"ISSUANCE_CREDIT_INLINE": "false"}).credit_inline is False
    assert settings_from({"ISSUANCE_CREDIT_INLINE": "YES"}).credit_inline is True
    with pytest.raises(SettingsError, match="ISSUANCE_CREDIT_INLINE must be true or false"):
        settings_from({"ISSUANCE_CREDIT_INLINE": "maybe"})


def test_the_phone_key_has_no_default():
    assert Settings().phone_key == ""
    assert settings_from({"ISSUANCE_PHONE_KEY": ""}).phone_key == ""


@pytest.mark.parametrize(
    ("key", "says"),
    [
        ("", "ISSUANCE_PHONE_KEY is not set"),
        ("k", "ISSUANCE_PHONE_KEY is 1 bytes long: it must be at least 16"),
        ("fifteen-bytes-x", "at least 16"),
        ("dev-only-phone-key-change-me", "placeholder"),
        ("CHANGE-ME-32-random-bytes", "placeholder"),
    ],
)
def test_a_missing_short_or_placeholder_phone_key_is_refused_in_one_line(key, says):
    with pytest.raises(PhoneKeyError, match=says) as raised:
        require_phone_key(settings_from({"ISSUANCE_PHONE_KEY": key}))
    assert "\n" not in str(raised.value)


def test_a_proper_phone_key_is_accepted():
    key = "sixteen-bytes-ok"
    assert require_phone_key(settings_from({"ISSUANCE_PHONE_KEY": key})) == key
