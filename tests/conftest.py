"""Fixtures shared by every test level.

Integration and end-to-end tests run against the real PostgreSQL, Redis and
RabbitMQ on their standard local ports (``make test`` starts them). Each test
session gets its own database, RabbitMQ vhost and Redis database number, so
parallel runs on one machine cannot see each other's data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
import redis
from issuance.shared.settings import PREFIX, Settings, settings_from

ADMIN_DSN = os.environ.get("ISSUANCE_TEST_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
RABBIT_HOST = "127.0.0.1:5672"
TABLES = (
    "wallet_ledger, codes, claims, package_slots, code_batches, coupon_templates, activities, channels,"
    " members, shares, share_opens, dead_letters, orders, referrals, cell_referrals, catalog_version,"
    " rebates, held_credits, lifecycle_refusals, key_fingerprints, ledger_checkpoints,"
    " claim_channels, code_writeoffs, promo_codes, promo_member_uses, promo_uses, ring_handovers,"
    " member_holdings"
)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The project's variables must not leak in from the shell."""
    for name in list(os.environ):
        if name.startswith(PREFIX):
            monkeypatch.delenv(name)


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def private_services() -> Iterator[dict[str, str]]:
    """Environment for a private database, vhost and Redis db on the real services."""
    tag = f"issuance_t_{secrets.token_hex(4)}"
    try:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{tag}"')
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable ({exc}); run `make services`", pytrace=False)
    try:
        _rabbitmqctl("add_vhost", tag)
        _rabbitmqctl("set_permissions", "-p", tag, "guest", ".*", ".*", ".*")
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.fail(f"RabbitMQ is not reachable ({exc}); run `make services`", pytrace=False)
    redis_db = int(tag[-2:], 16) % 15 + 1
    env = {
        f"{PREFIX}DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/{tag}",
        f"{PREFIX}AMQP_URL": f"amqp://guest:guest@{RABBIT_HOST}/{tag}",
        f"{PREFIX}REDIS_URL": f"redis://127.0.0.1:6379/{redis_db}",
        f"{PREFIX}PHONE_KEY": "test-phone-key-0123456789abcdef",
        f"{PREFIX}MIN_BACKOFF_MS": "100",
        f"{PREFIX}MAX_BACKOFF_MS": "1000",
    }
    try:
        redis.Redis.from_url(env[f"{PREFIX}REDIS_URL"]).flushdb()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not reachable ({exc}); run `make services`", pytrace=False)
    from issuance.shared.db import database

    database.upgrade(settings_from(env))
    try:
        yield env
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{tag}" WITH (FORCE)')
        _rabbitmqctl("delete_vhost", tag)


@pytest.fixture(scope="session")
def service_env() -> Iterator[dict[str, str]]:
    """The test session's private services (see :func:`private_services`)."""
    with private_services() as env:
        yield env


@pytest.fixture
def settings(service_env: dict[str, str]) -> Iterator[Settings]:
    """Settings for the private services, with every table emptied first."""
    current = settings_from(service_env)
    with psycopg.connect(current.database_url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    redis.Redis.from_url(current.redis_url).flushdb()
    _forget_ledger(current)
    yield current


def _forget_ledger(settings: Settings) -> None:
    """Delete the acceptance ledger stream: its entries name claims whose
    rows were just truncated (a publisher declares it again)."""
    import pika
    from issuance.shared.wire import codec

    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        connection.channel().queue_delete(codec.LEDGER_QUEUE)
    finally:
        connection.close()


@pytest.fixture
def two_step(settings: Settings) -> Settings:
    """Settings that leave every credit to the credit step (credit_inline off)."""
    return dataclasses.replace(settings, credit_inline=False)


@pytest.fixture
def pool(settings: Settings) -> Iterator[Any]:
    from issuance.shared.db import database

    p = database.pool(settings, max_size=20)
    yield p
    p.close()


def make_activity(
    settings: Settings,
    *,
    slug: str | None = None,
    budget: int = 100,
    codes: int = 100,
    templates: int = 1,
    new_user_template: bool = False,
    group: str | None = None,
    starts_in: timedelta = timedelta(hours=-1),
    lasts: timedelta = timedelta(days=1),
    online: bool = True,
) -> dict[str, Any]:
    """Create a channel (if needed), an activity and its code pool."""
    from issuance.shared.backoffice import catalog
    from issuance.shared.db import database
    from issuance.shared.db.models import Channel
    from issuance.shared.domain import CODE_ALPHABET
    from issuance.shared.wire.messages import utcnow
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    slug = slug or f"act-{secrets.token_hex(3)}"
    prefixes = ["".join(secrets.choice(CODE_ALPHABET) for _ in range(3)) for _ in range(templates)]
    specs: list[dict[str, Any]] = [{"prefix": p, "kind": "amount_off", "value": 500} for p in prefixes]
    if new_user_template:
        specs[-1]["new_user_only"] = True
    now = utcnow()
    engine = database.engine(settings)
    with Session(engine) as session, session.begin():
        if session.scalar(select(Channel).where(Channel.name == "test")) is None:
            catalog.create_channel(session, "test")
        spec = catalog.ActivitySpec.from_mapping(
            {
                "slug": slug,
                "title": f"Activity {slug}",
                "channel": "test",
                "starts_at": now + starts_in,
                "ends_at": now + starts_in + lasts,
                "budget": budget,
                "templates": specs,
                "exclusivity_group": group,
                "online": online,
            }
        )
        catalog.create_activity(session, spec)
        for prefix in prefixes:
            if codes:
                catalog.generate_codes(session, prefix, codes)
    engine.dispose()
    return {"slug": slug, "prefixes": prefixes}


def claim(activity: str, phone: str | None = None, **overrides: Any) -> Any:
    from issuance.shared.wire.messages import ClaimRequested, utcnow

    values: dict[str, Any] = {
        "claim_id": uuid.uuid4(),
        "activity": activity,
        "phone": phone or f"+86139{secrets.randbelow(10**8):08d}",
        "requested_at": utcnow(),
    }
    values.update(overrides)
    return ClaimRequested(**values)


def verify_clean(settings: Settings) -> dict[str, Any]:
    """Run the reconciliation and fail the test on any breach."""
    from issuance.shared.db.verify import verify

    with psycopg.connect(settings.database_url) as conn:
        report = verify(conn)
    assert report.clean, report.as_json()
    return report.as_json()


def take_all(settings: Settings, queue: str) -> list[tuple[Any, bytes]]:
    """(properties, body) of every message in ``queue``, taken off it in order."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    out = []
    try:
        channel = connection.channel()
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append((properties, body))
    finally:
        connection.close()


def cell_map(envs: list[dict[str, str]]) -> str:
    """A cell map (ISSUANCE_CELLS) over private services: cells "a", "b",
    ... numbered in order, each with its own database, vhost and Redis."""
    return json.dumps(
        [
            {
                "name": "abcdefgh"[number],
                "number": number,
                "database_url": env[f"{PREFIX}DATABASE_URL"],
                "amqp_url": env[f"{PREFIX}AMQP_URL"],
                "redis_url": env[f"{PREFIX}REDIS_URL"],
            }
            for number, env in enumerate(envs)
        ]
    )
