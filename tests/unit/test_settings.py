from __future__ import annotations

import pytest
from issuance.shared.settings import Settings, SettingsError, settings_from


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
