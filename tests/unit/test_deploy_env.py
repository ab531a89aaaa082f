"""The reference deployment's env files, one per process: deploy/systemd
(EnvironmentFile of each unit) and deploy/kubernetes/env (one Secret each).
Each process holds only its own identities (the page no worker credential,
no migration role), names only variables the settings read, no secret with a
usable value, TLS everywhere, metrics on loopback."""

from __future__ import annotations

import configparser
import dataclasses
import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from issuance.shared.settings import PLACEHOLDER_MARKS, PREFIX, Settings, settings_from

DEPLOY = Path(__file__).parents[2] / "deploy"
SYSTEMD = DEPLOY / "systemd"
KUBERNETES_ENV = DEPLOY / "kubernetes" / "env"
SECRET_NAMES = ("ISSUANCE_PHONE_KEY", "ISSUANCE_PHONE_KEYS", "ISSUANCE_SIGNING_KEYS")
SETTINGS_VARIABLES = {PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
# Variables the env files may set that are not settings, and who reads them.
OTHER_VARIABLES = {"SSL_CERT_FILE": "OpenSSL (pika): the CA of the broker's certificate"}
URL_VARIABLES = {
    "database": "ISSUANCE_DATABASE_URL",
    "amqp": "ISSUANCE_AMQP_URL",
    "redis": "ISSUANCE_REDIS_URL",
}
WORKER = {"database": "issuance_worker", "amqp": "issuance-worker", "redis": "issuance-worker"}
# Who each process is on each service (None: no credential for it at all),
# as deploy/postgresql/roles.sql, deploy/rabbitmq/definitions.json and
# deploy/redis/users.acl define them, and the keys it may hold.
IDENTITIES: dict[str, dict[str, str | None]] = {
    "page": {"database": "issuance_page", "amqp": "issuance-producer", "redis": "issuance-page"},
    "worker": WORKER,
    "sweeper": WORKER,
    "dead-letters": {**WORKER, "redis": None},
    # The exporter reads queue depths with passive declares only.
    "exporter": {"database": "issuance_reader", "amqp": "issuance-monitor", "redis": None},
    "migrations": {"database": "issuance_migrate", "amqp": None, "redis": None},
}
KEYS = {"page": set(SECRET_NAMES), "worker": set(SECRET_NAMES), "sweeper": {"ISSUANCE_SIGNING_KEYS"}}
PROCESS_OF_FILE = {"migrate": "migrations"}  # deploy/systemd's name for it


def process_of(path: Path) -> str:
    return PROCESS_OF_FILE.get(path.stem, path.stem)


def check_identity(process: str, values: dict[str, str]) -> None:
    """``values`` (one process's env) names only settings, and gives the
    process its own identity on each service and nobody else's."""
    unknown = set(values) - SETTINGS_VARIABLES - set(OTHER_VARIABLES)
    assert not unknown, f"{process} sets variables nothing reads: {sorted(unknown)}"
    for service, variable in URL_VARIABLES.items():
        wanted = IDENTITIES[process][service]
        if wanted is None:
            assert variable not in values, f"{process} holds {service} credentials it does not need"
        else:  # every URL of a broker list (a;b;c) too
            for url in values[variable].split(";"):
                user = urlsplit(url).username
                assert user == wanted, f"{process} connects to {service} as {user}, not {wanted}"
    extra = {name for name in SECRET_NAMES if name in values} - KEYS.get(process, set())
    assert not extra, f"{process} holds keys it does not use: {sorted(extra)}"
    if process == "page":
        assert values.get("ISSUANCE_PRODUCER_EXCHANGE") == "issuance.producers"
        assert not [value for value in values.values() if "worker" in value or "migrate" in value]


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


ENV_FILES = sorted(SYSTEMD.glob("*.env")) + sorted(KUBERNETES_ENV.glob("*.env"))


def _name(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


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
    for page in (env_file(SYSTEMD / "page.env"), env_file(KUBERNETES_ENV / "page.env")):
        check_identity("page", page)
    definitions = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    (producer,) = [p for p in definitions["permissions"] if p["user"] == "issuance-producer"]
    assert (producer["configure"], producer["read"]) == ("^$", "^$")
    assert producer["write"] == "^issuance\\.producers$"


def test_every_process_has_an_env_file_in_each_deployment() -> None:
    assert {process_of(p) for p in SYSTEMD.glob("*.env")} == set(IDENTITIES)
    assert {process_of(p) for p in KUBERNETES_ENV.glob("*.env")} == set(IDENTITIES)


@pytest.mark.parametrize("path", ENV_FILES, ids=_name)
def test_each_process_holds_only_its_own_identities(path: Path) -> None:
    check_identity(process_of(path), env_file(path))


def _with(path: Path, **changes: str) -> dict[str, str]:
    return {**env_file(path), **changes}


PAGE = KUBERNETES_ENV / "page.env"
BROKEN = {
    "the page with the worker's AMQP user": (
        "page",
        _with(PAGE, ISSUANCE_AMQP_URL="amqps://issuance-worker:@issuance-rabbitmq:5671/issuance"),
    ),
    "the page with the migration role": (
        "page",
        _with(
            SYSTEMD / "page.env", ISSUANCE_DATABASE_URL="postgresql://issuance_migrate@db.internal/issuance"
        ),
    ),
    "the page with the worker's Redis user": (
        "page",
        _with(PAGE, ISSUANCE_REDIS_URL="rediss://issuance-worker:@redis:6380/0"),
    ),
    "the page publishing to the default exchange": ("page", _with(PAGE, ISSUANCE_PRODUCER_EXCHANGE="")),
    "the exporter with the worker's AMQP user": (
        "exporter",
        _with(KUBERNETES_ENV / "exporter.env", ISSUANCE_AMQP_URL="amqps://issuance-worker:@mq:5671/issuance"),
    ),
    "the exporter with a Redis user": (
        "exporter",
        _with(SYSTEMD / "exporter.env", ISSUANCE_REDIS_URL="rediss://issuance-worker:@cache:6380/0"),
    ),
    "the exporter with the phone key": (
        "exporter",
        _with(KUBERNETES_ENV / "exporter.env", ISSUANCE_PHONE_KEY=""),
    ),
    "a setting misspelt": ("worker", _with(KUBERNETES_ENV / "worker.env", ISSUANCE_REDIS_UR="rediss://x")),
}


@pytest.mark.parametrize("fault", list(BROKEN))
def test_a_process_with_another_identity_fails(fault: str) -> None:
    process, values = BROKEN[fault]
    with pytest.raises(AssertionError):
        check_identity(process, values)


@pytest.mark.parametrize("path", ENV_FILES, ids=_name)
def test_no_env_file_sets_a_usable_secret(path: Path) -> None:
    values = env_file(path)
    for name in SECRET_NAMES:
        assert values.get(name, "") == "", f"{path.name} sets {name}: secrets are filled in on the host"
    for name, value in values.items():
        lowered = value.lower()
        assert not any(mark in lowered for mark in PLACEHOLDER_MARKS), f"{path.name}: {name} is a placeholder"
        if "://" in value:
            assert not urlsplit(value).password, f"{path.name}: {name} carries a password"


@pytest.mark.parametrize("path", ENV_FILES, ids=_name)
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
