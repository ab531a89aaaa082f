"""Shared promo codes as an operator makes them, and codes redeemed without
an order (written off), for the ``issuance coupons`` commands. The SQL is
:mod:`issuance.shared.db.promo_store`; errors are one line
(:class:`~issuance.shared.backoffice.catalog.BackOfficeError`)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import psycopg
from issuance.shared.backoffice.catalog import BackOfficeError
from issuance.shared.db import promo_store as ps

PROMO_CODE = re.compile(r"^[A-Za-z0-9]{1,16}$")
MAX_USES = 100_000_000
WHO = 64
WHY = 200


def create_promo(conn: psycopg.Connection[Any], spec: ps.PromoSpec) -> int:
    """Create a shared promo code on a template; every bad value is refused
    with what is wrong."""
    problem = promo_problem(spec)
    if problem is not None:
        raise BackOfficeError(problem)
    with conn.transaction():
        if conn.execute("SELECT 1 FROM codes WHERE code = %s", (spec.code,)).fetchone():
            raise BackOfficeError(f"{spec.code} is a coupon code already: choose another promo code")
        promo_id = ps.insert_promo(conn, spec)
        if promo_id is None:
            if conn.execute("SELECT 1 FROM promo_codes WHERE code = %s", (spec.code,)).fetchone():
                raise BackOfficeError(f"promo code {spec.code} exists already")
            raise BackOfficeError(f"no template with the prefix {spec.template!r}")
    return promo_id


def promo_problem(spec: ps.PromoSpec) -> str | None:
    """What is wrong with a promo code as an operator wrote it, or None."""
    if not PROMO_CODE.match(spec.code):
        return f"the promo code must be 1 to 16 letters or digits, got {spec.code!r}"
    if type(spec.max_uses) is not int or not 1 <= spec.max_uses <= MAX_USES:
        return f"max uses must be a whole number from 1 to {MAX_USES}, got {spec.max_uses!r}"
    limit = spec.per_member_limit
    if limit is not None and (type(limit) is not int or not 1 <= limit <= spec.max_uses):
        return f"the per-member limit must be a whole number from 1 to max uses, got {limit!r}"
    for name, when in (("valid from", spec.valid_from), ("valid until", spec.valid_until)):
        if when is not None and when.tzinfo is None:
            return f"{name} must carry a time zone (e.g. 2026-12-01T00:00+08:00)"
    if spec.valid_from and spec.valid_until and spec.valid_from >= spec.valid_until:
        return "valid from must come before valid until"
    return None


def write_off(
    conn: psycopg.Connection[Any], code: str, *, by: str, reason: str, at: datetime, channel: str = "operator"
) -> ps.WriteOffAnswer:
    """Redeem a gift coupon or a partner's or printed code without an order,
    with an audit record; a refusal is a one-line error naming why."""
    problem = writeoff_problem(code, by=by, reason=reason)
    if problem is not None:
        raise BackOfficeError(problem)
    with conn.transaction():
        answer = ps.write_off_code(conn, code, channel=channel, by=by, reason=reason, at=at)
    if answer.refusal is not None:
        raise BackOfficeError(f"{code}: cannot write off, {answer.refusal.text} ({answer.refusal.value})")
    return answer


def writeoff_problem(code: str, *, by: str, reason: str) -> str | None:
    """What is wrong with a write-off request, or None."""
    if not PROMO_CODE.match(code):
        return f"a code is 1 to 16 letters or digits, got {code!r}"
    if not 0 < len(by.strip()) <= WHO or by != by.strip():
        return f"--by names who writes the code off: 1 to {WHO} characters"
    if not 0 < len(reason.strip()) <= WHY:
        return f"--reason says why: 1 to {WHY} characters"
    return None
