"""What the database refuses about codes now that their keys are checked once
per statement (migration 0011) instead of by foreign-key triggers per row and
a second unique index on the code: a code is unique, belongs to a batch of its
own template, is bound once and to a claim or rebate that exists, and a wallet
entry is its code's binding. Each write goes straight to PostgreSQL, past the
application's own rules."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from tests.integration.lifecycle_support import activity_with, member_with_package, one


def _batch(settings, prefix: str) -> tuple[int, int]:
    return one(
        settings,
        "SELECT b.template_id, b.batch_id FROM code_batches b JOIN coupon_templates t USING (template_id)"
        " WHERE t.prefix = %s",
        prefix,
    )


def _copy(conn: psycopg.Connection, rows: list[tuple[str, int, int]]) -> None:
    with conn.cursor().copy("COPY codes (code, template_id, batch_id) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def _two_templates(settings):
    first, second = (
        activity_with(settings, codes=3)["templates"][0],
        activity_with(settings, codes=3)["templates"][0],
    )
    return _batch(settings, first["prefix"]), _batch(settings, second["prefix"]), first["prefix"]


def test_a_duplicate_code_is_refused_by_copy_and_by_insert(settings):
    (template, batch), _, prefix = _two_templates(settings)
    code = one(settings, "SELECT code FROM codes WHERE batch_id = %s LIMIT 1", batch)
    with psycopg.connect(settings.database_url) as conn, pytest.raises(psycopg.errors.UniqueViolation):
        _copy(conn, [(prefix + "Z" * 13, template, batch), (code, template, batch)])
    with psycopg.connect(settings.database_url) as conn, pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(
            "INSERT INTO codes (code, template_id, batch_id) VALUES (%s, %s, %s)", (code, template, batch)
        )


def test_a_code_belongs_to_a_batch_of_its_own_template(settings):
    (template, batch), (other_template, other_batch), prefix = _two_templates(settings)
    bad = [
        (template, other_batch),  # the batch of another template
        (other_template, batch),
        (template, 999_999),  # no such batch
    ]
    for bad_template, bad_batch in bad:
        # In a COPY of many good rows and one bad one, and alone.
        rows = [(f"{prefix}{n:013d}", template, batch) for n in range(50)]
        rows.append((prefix + "Q" * 13, bad_template, bad_batch))
        with (
            psycopg.connect(settings.database_url) as conn,
            pytest.raises(psycopg.errors.ForeignKeyViolation),
        ):
            _copy(conn, rows)
        with (
            psycopg.connect(settings.database_url) as conn,
            pytest.raises(psycopg.errors.ForeignKeyViolation),
        ):
            conn.execute(
                "INSERT INTO codes (code, template_id, batch_id) VALUES (%s, %s, %s)",
                (prefix + "Q" * 13, bad_template, bad_batch),
            )
    with psycopg.connect(settings.database_url) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("UPDATE codes SET batch_id = %s WHERE batch_id = %s", (other_batch, batch))
    with psycopg.connect(settings.database_url) as conn, pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute("DELETE FROM code_batches WHERE batch_id = %s", (batch,))
    # The good rows alone go in.
    with psycopg.connect(settings.database_url) as conn:
        _copy(conn, [(f"{prefix}{n:013d}", template, batch) for n in range(50)])
    assert one(settings, "SELECT count(*) FROM codes WHERE batch_id = %s", batch) == 53


def test_a_code_is_bound_once(settings, pool):
    act = activity_with(settings, codes=5)
    member, (code,), claim_id = member_with_package(pool, settings, act["slug"])
    other_member, (other_code,), other_claim = member_with_package(pool, settings, act["slug"])
    free = one(settings, "SELECT code FROM codes WHERE status = 'available' LIMIT 1")
    # Bound to another claim, or unbound, once bound: refused.
    for sql, params in (
        ("UPDATE codes SET claim_id = %s, member_id = %s WHERE code = %s", (other_claim, other_member, code)),
        (
            "UPDATE codes SET claim_id = NULL, member_id = NULL, status = 'available', bound_at = NULL"
            " WHERE code = %s",
            (code,),
        ),
    ):
        with psycopg.connect(settings.database_url) as conn, pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(sql, params)
    # A second code of the same template for the same claim: refused.
    with psycopg.connect(settings.database_url) as conn, pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(
            "UPDATE codes SET status = 'unused', claim_id = %s, member_id = %s WHERE code = %s",
            (claim_id, member, free),
        )
    # Bound to a claim that does not exist, or to a rebate that does not.
    for owner_column, owner in (("claim_id", uuid.uuid4()), ("rebate_id", 999_999)):
        with (
            psycopg.connect(settings.database_url) as conn,
            pytest.raises(psycopg.errors.ForeignKeyViolation),
        ):
            conn.execute(
                f"UPDATE codes SET status = 'unused', {owner_column} = %s, member_id = %s WHERE code = %s",
                (owner, member, free),
            )
    # A wallet entry for a code that another claim holds: refused.
    with psycopg.connect(settings.database_url) as conn, pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute(
            "INSERT INTO wallet_ledger (member_id, claim_id, code) VALUES (%s, %s, %s)",
            (other_member, other_claim, code),
        )
    with psycopg.connect(settings.database_url) as conn, pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute("UPDATE wallet_ledger SET code = %s WHERE code = %s", (other_code, code))
    # A credited code, or a claim that holds codes, cannot be deleted.
    with psycopg.connect(settings.database_url) as conn, pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute("DELETE FROM codes WHERE code = %s", (code,))
    with psycopg.connect(settings.database_url) as conn, pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute("DELETE FROM claims WHERE claim_id = %s", (claim_id,))
    assert one(settings, "SELECT claim_id FROM codes WHERE code = %s", code) == claim_id
    assert one(settings, "SELECT count(*) FROM wallet_ledger WHERE code = %s", code) == 1


def test_a_used_code_names_an_order_that_exists(settings, pool):
    act = activity_with(settings, codes=5)
    _, (code,), _ = member_with_package(pool, settings, act["slug"])
    with psycopg.connect(settings.database_url) as conn, pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute(
            "UPDATE codes SET status = 'used', order_id = 'SO-none', used_at = now(), discount_cents = 0"
            " WHERE code = %s",
            (code,),
        )
