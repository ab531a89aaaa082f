"""The reference deployment's env files (deploy/systemd): one per process,
the page without worker credentials, no secret with a usable value, TLS
everywhere, metrics on loopback."""

from __future__ import annotations

import configparser
import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from issuance.shared.settings import PLACEHOLDER_MARKS, settings_from

DEPLOY = Path(__file__).parents[2] / "deploy"
SYSTEMD = DEPLOY / "systemd"
SECRET_NAMES = ("ISSUANCE_PHONE_KEY", "ISSUANCE_SIGNING_KEYS")


def env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def units() -> dict[str, configparser.ConfigParser]:
    found = {}
    for path in sorted(SYSTEMD.glob("*.service")):
        unit = configparser.ConfigParser(strict=False, interpolation=None)
        unit.optionxform = str  # type: ignore[assignment,method-assign]
        unit.read(path)
        found[path.stem] = unit
    return found


ENV_FILES = sorted(SYSTEMD.glob("*.env"))


def test_every_process_has_its_own_env_file() -> None:
    used = {}
    for name, unit in units().items():
        target = unit["Service"]["EnvironmentFile"]
        assert target.startswith("/etc/issuance/") and target.endswith(".env"), name
        assert (SYSTEMD / Path(target).name).exists(), f"{name} reads {target}, which deploy/systemd lacks"
        assert target not in used, f"{name} and {used.get(target)} share {target}"
        used[target] = name
    assert {"issuance-web", "issuance-worker", "issuance-exporter", "issuance-sweeper"} <= set(units())
    assert "issuance-dead-letters" in units() and (SYSTEMD / "issuance-dead-letters.timer").exists()
    assert not (SYSTEMD / "env.example").exists()


def test_the_page_has_no_worker_credentials() -> None:
    page = env_file(SYSTEMD / "page.env")
    assert urlsplit(page["ISSUANCE_AMQP_URL"]).username == "issuance-producer"
    assert page["ISSUANCE_PRODUCER_EXCHANGE"] == "issuance.producers"
    assert urlsplit(page["ISSUANCE_DATABASE_URL"]).username == "issuance_page"
    assert urlsplit(page["ISSUANCE_REDIS_URL"]).username == "issuance-page"
    assert not [value for value in page.values() if "worker" in value]
    definitions = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    (producer,) = [p for p in definitions["permissions"] if p["user"] == "issuance-producer"]
    assert (producer["configure"], producer["read"]) == ("^$", "^$")
    assert producer["write"] == "^issuance\\.producers$"


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
def test_no_env_file_sets_a_usable_secret(path: Path) -> None:
    values = env_file(path)
    for name in SECRET_NAMES:
        assert values.get(name, "") == "", f"{path.name} sets {name}: secrets are filled in on the host"
    for name, value in values.items():
        lowered = value.lower()
        assert not any(mark in lowered for mark in PLACEHOLDER_MARKS), f"{path.name}: {name} is a placeholder"
        if "://" in value:
            assert not urlsplit(value).password, f"{path.name}: {name} carries a password"


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
def test_every_connection_uses_tls_and_metrics_stay_local(path: Path) -> None:
    values = env_file(path)
    settings = settings_from(values)  # every file is valid for the settings
    if "ISSUANCE_AMQP_URL" in values:
        assert values["ISSUANCE_AMQP_URL"].startswith("amqps://")
    if "ISSUANCE_REDIS_URL" in values:
        url = urlsplit(values["ISSUANCE_REDIS_URL"])
        assert url.scheme == "rediss" and url.username
    database = urlsplit(values["ISSUANCE_DATABASE_URL"])
    assert parse_qs(database.query)["sslmode"] == ["verify-full"]
    assert database.username and database.username != "postgres"
    assert settings.metrics_bind == "127.0.0.1"


def test_metrics_bind_to_loopback_unless_told() -> None:
    assert settings_from({}).metrics_bind == "127.0.0.1"
    assert settings_from({"ISSUANCE_METRICS_BIND": "10.1.2.3"}).metrics_bind == "10.1.2.3"
