"""Helpers of the lifecycle and rebate tests: members with credited
packages, orders placed and moved, rows read back."""

from __future__ import annotations

import secrets
import uuid
from datetime import datetime, timedelta
from typing import Any

import psycopg
from issuance.shared.domain import share_id_for
from issuance.shared.wire.messages import CreditRequested, OrderPlaced, OrderStatusChanged, utcnow
from issuance.workers import lifecycle
from issuance.workers.handlers import handle_claim, handle_credit, handle_order_placed

from tests.conftest import claim


def phone() -> str:
    return f"+86139{secrets.randbelow(10**8):08d}"


def member_with_package(pool, settings, slug: str, number: str | None = None, **overrides: Any):
    """Claim and credit a package; return (member_id, codes, claim_id)."""
    outcome = handle_claim(pool, settings, claim(slug, number or phone(), **overrides))
    assert outcome.status in ("credited", "bound"), outcome
    if outcome.status == "bound":  # credit_inline off, or a hold
        handle_credit(pool, CreditRequested(claim_ids=(outcome.claim_id,)))
    return member_of(settings, outcome.claim_id), list(outcome.codes), outcome.claim_id


def member_of(settings, claim_id: uuid.UUID) -> int:
    return int(one(settings, "SELECT member_id FROM claims WHERE claim_id = %s", claim_id))


def one(settings, sql: str, *params: Any) -> Any:
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute(sql, params).fetchone()
    return None if row is None else (row[0] if len(row) == 1 else row)


def rows(settings, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(settings.database_url) as conn:
        return conn.execute(sql, params).fetchall()


def place(
    pool,
    member_id: int,
    *,
    amount: int = 10_000,
    codes: tuple[str, ...] = (),
    order_id: str | None = None,
    activity: str | None = None,
    at: datetime | None = None,
) -> OrderPlaced:
    """Publish-equivalent of an order-placed event: the share opens and the
    order (with its coupons) is recorded."""
    message = OrderPlaced(
        order_id=order_id or f"SO-{secrets.token_hex(6)}",
        member_id=member_id,
        amount_cents=amount,
        placed_at=at or utcnow(),
        activity=activity,
        redeemed_codes=codes,
    )
    handle_order_placed(pool, message)
    lifecycle.record_order(pool, message)
    return message


def move(
    pool,
    order_id: str,
    status: str,
    at: datetime | None = None,
    *,
    refunded_by: str | None = None,
    min_referral_cents: int = 1_000,
) -> lifecycle.StatusOutcome:
    message = OrderStatusChanged(
        order_id=order_id, status=status, changed_at=at or utcnow(), refunded_by=refunded_by
    )
    return lifecycle.handle_order_status(pool, message, min_referral_cents=min_referral_cents)


def share_of(order: OrderPlaced) -> uuid.UUID:
    return share_id_for(order.order_id)


def refusals(settings) -> list[tuple[str, str]]:
    return [
        tuple(r) for r in rows(settings, "SELECT subject, reason FROM lifecycle_refusals ORDER BY refusal_id")
    ]


def later(days: float) -> datetime:
    return utcnow() + timedelta(days=days)


def prefix() -> str:
    from issuance.shared.domain import CODE_ALPHABET

    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(3))


def activity_with(settings, *, codes: int = 20, templates: list[dict[str, Any]] | None = None, **fields: Any):
    """An activity from a full spec (defaults: live for a day, budget 50, one
    amount-off template of 5.00 above 50.00), with ``codes`` codes per template."""
    from issuance.shared.backoffice import catalog
    from issuance.shared.db import database
    from issuance.shared.db.models import Channel
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    now = utcnow()
    spec: dict[str, Any] = {
        "slug": f"act-{secrets.token_hex(3)}",
        "title": "Test activity",
        "channel": "test",
        "starts_at": now - timedelta(hours=1),
        "ends_at": now + timedelta(days=1),
        "budget": 50,
        "templates": [{"prefix": prefix(), "kind": "amount_off", "value": 500, "threshold_cents": 5000}]
        if templates is None
        else templates,
    }
    spec.update(fields)
    engine = database.engine(settings)
    with Session(engine) as session, session.begin():
        if session.scalar(select(Channel).where(Channel.name == "test")) is None:
            catalog.create_channel(session, "test")
        catalog.create_activity(session, catalog.ActivitySpec.from_mapping(spec))
        for template in spec["templates"]:
            if codes:
                catalog.generate_codes(session, template["prefix"], codes)
    engine.dispose()
    return spec
