"""What the database refuses about claims now that their activity, slot and
member are checked once per statement (migration 0019) instead of by three
foreign-key triggers per row: a claim names an activity with its group, a
slot of that activity and a member that exist; none of them can be deleted
or re-keyed under it; an activity's new group is carried to its claims.
Each write goes straight to PostgreSQL, past the application's own rules."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from tests.conftest import make_activity
from tests.integration.lifecycle_support import member_with_package, one

COLUMNS = "claim_id, activity_slug, activity_id, exclusivity_group, member_id, slot_no"
# A row without a member is a refusal (no keys to check), one with a member a grant.
INSERT = f"""
INSERT INTO claims ({COLUMNS}, status, reason, payload_digest, requested_at, deadline)
SELECT g.*, CASE WHEN g.member_id IS NULL THEN 'refused' ELSE 'bound' END,
       CASE WHEN g.member_id IS NULL THEN 'bad_phone' END, '\\x00'::bytea, now(), now() + interval '1 day'
  FROM (VALUES {{rows}}) AS g({COLUMNS})
"""


def _granted(settings, pool):
    act = make_activity(settings, budget=10)
    member, _, claim_id = member_with_package(pool, settings, act["slug"])
    activity_id, group = one(
        settings, "SELECT activity_id, exclusivity_group FROM activities WHERE slug = %s", act["slug"]
    )
    return act["slug"], activity_id, group, member, claim_id


def _insert(settings, rows: list[tuple[object, ...]]) -> None:
    values = ", ".join(["(%s::uuid, %s, %s::int, %s, %s::bigint, %s::int)"] * len(rows))
    with psycopg.connect(settings.database_url) as conn:
        conn.execute(INSERT.format(rows=values), [v for row in rows for v in row])


def test_a_claim_names_an_activity_with_its_group_a_slot_of_it_and_a_member(settings, pool):
    slug, activity_id, group, _, _ = _granted(settings, pool)
    free = one(
        settings, "SELECT min(slot_no) FROM package_slots WHERE activity_id = %s AND NOT taken", activity_id
    )
    other_member = one(settings, "INSERT INTO members (phone_digest) VALUES ('\\x01') RETURNING member_id")
    bad = {
        "claims_activity_group_fkey": (uuid.uuid4(), slug, activity_id, "another-group", other_member, free),
        "claims_slot_fkey": (uuid.uuid4(), slug, activity_id, group, other_member, 999_999),
        "claims_member_id_fkey": (uuid.uuid4(), slug, activity_id, group, 987_654_321, free),
    }
    for constraint, row in bad.items():
        # Among good rows of a statement, and alone.
        others = [(uuid.uuid4(), slug, None, None, None, None) for _ in range(3)]
        for rows in ([*others, row], [row]):
            with pytest.raises(psycopg.errors.ForeignKeyViolation) as caught:
                _insert(settings, rows)
            assert caught.value.diag.constraint_name == constraint
    good = uuid.uuid4()
    _insert(settings, [(good, slug, activity_id, group, other_member, free)])
    # An update that changes a claim's keys is checked the same way.
    with psycopg.connect(settings.database_url) as conn, pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute("UPDATE claims SET slot_no = 999999 WHERE claim_id = %s", (good,))
    with psycopg.connect(settings.database_url) as conn, pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute("UPDATE claims SET member_id = 987654321 WHERE claim_id = %s", (good,))


def test_what_a_claim_names_cannot_be_deleted_or_rekeyed(settings, pool):
    _, activity_id, _, member, claim_id = _granted(settings, pool)
    slot = one(settings, "SELECT slot_no FROM claims WHERE claim_id = %s", claim_id)
    refused = [
        ("DELETE FROM members WHERE member_id = %s", (member,)),
        ("UPDATE members SET member_id = member_id + 1000000 WHERE member_id = %s", (member,)),
        ("DELETE FROM package_slots WHERE activity_id = %s AND slot_no = %s", (activity_id, slot)),
        (
            "UPDATE package_slots SET slot_no = 999999 WHERE activity_id = %s AND slot_no = %s",
            (activity_id, slot),
        ),
        ("DELETE FROM package_slots WHERE activity_id = %s", (activity_id,)),
    ]
    for sql, params in refused:
        with (
            psycopg.connect(settings.database_url) as conn,
            pytest.raises(psycopg.errors.ForeignKeyViolation),
        ):
            conn.execute(sql, params)
    # A slot no claim holds can go (a budget shrunk).
    with psycopg.connect(settings.database_url) as conn:
        gone = conn.execute(
            "DELETE FROM package_slots WHERE activity_id = %s AND slot_no <> %s", (activity_id, slot)
        ).rowcount
    assert gone == 9


def test_an_activity_s_new_group_is_carried_to_its_claims(settings, pool):
    _, activity_id, _, _, claim_id = _granted(settings, pool)
    with psycopg.connect(settings.database_url) as conn:
        conn.execute(
            "UPDATE activities SET exclusivity_group = 'spring-wave' WHERE activity_id = %s", (activity_id,)
        )
    assert (
        one(settings, "SELECT exclusivity_group FROM claims WHERE claim_id = %s", claim_id) == "spring-wave"
    )
