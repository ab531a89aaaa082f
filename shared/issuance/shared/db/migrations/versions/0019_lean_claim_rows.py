"""a claim row costs fewer writes: no unique (claim_id, member_id) key, and
its activity, slot and member are checked once per statement instead of by
three foreign-key triggers per row; a new member writes no entry in the
unique index of app member IDs

Revision ID: 0019
Revises: 0015
Create Date: 2026-11-30 11:40:00

The unique key existed for a composite foreign key from codes and the
wallet to (claim, member). Since 0011 those are checked per statement
against the primary key (codes_owners_check), and nothing else used it:
every claim paid for one more B-tree entry led by a random UUID.

The three foreign keys of a claim (its activity and exclusivity group, its
package slot, its member) fired one trigger each per row written, about
half the cost of recording a batch of claims. The same invariants are now
held as in 0011:

- a claim names an activity with that exclusivity group, a package slot of
  that activity and a member that exist: checked by one query per INSERT or
  UPDATE statement over its transition table (for an update, over the rows
  whose keys changed), taking the KEY SHARE locks a foreign key takes;
- an activity, slot or member a claim names cannot be deleted or re-keyed
  (checked after the change, so a claim written meanwhile by a transaction
  holding the KEY SHARE lock is seen), and an activity's new exclusivity
  group is carried to its claims (the ON UPDATE CASCADE of the old key).

The app member ID is unique over the members that have one: a member made
by a claim (most of them, none linked yet) no longer writes a NULL entry.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0015"
branch_labels = None
depends_on = None

FUNCTIONS = r"""
CREATE FUNCTION claims_keys_check(written claims[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM (SELECT DISTINCT w.activity_id, w.exclusivity_group FROM unnest(written) w
                        WHERE w.activity_id IS NOT NULL AND w.exclusivity_group IS NOT NULL) n
         WHERE (SELECT 1 FROM activities a
                 WHERE a.activity_id = n.activity_id AND a.exclusivity_group = n.exclusivity_group
                   FOR KEY SHARE) IS NULL)
    THEN
        RAISE EXCEPTION 'a claim must name an activity with its exclusivity group'
              USING ERRCODE = 'foreign_key_violation', TABLE = 'claims',
                    CONSTRAINT = 'claims_activity_group_fkey';
    END IF;
    IF EXISTS (
        SELECT 1 FROM unnest(written) w
         WHERE w.activity_id IS NOT NULL AND w.slot_no IS NOT NULL
           AND (SELECT 1 FROM package_slots s
                 WHERE s.activity_id = w.activity_id AND s.slot_no = w.slot_no FOR KEY SHARE) IS NULL)
    THEN
        RAISE EXCEPTION 'a claim must hold a package slot of its activity'
              USING ERRCODE = 'foreign_key_violation', TABLE = 'claims', CONSTRAINT = 'claims_slot_fkey';
    END IF;
    IF EXISTS (
        SELECT 1 FROM (SELECT DISTINCT w.member_id FROM unnest(written) w WHERE w.member_id IS NOT NULL) n
         WHERE (SELECT 1 FROM members m WHERE m.member_id = n.member_id FOR KEY SHARE) IS NULL)
    THEN
        RAISE EXCEPTION 'a claim must name a member that exists'
              USING ERRCODE = 'foreign_key_violation', TABLE = 'claims', CONSTRAINT = 'claims_member_id_fkey';
    END IF;
END $$;

CREATE FUNCTION claims_inserted_check() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM claims_keys_check(ARRAY(SELECT n::claims FROM new_claims n));
    RETURN NULL;
END $$;

CREATE FUNCTION claims_updated_check() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM claims_keys_check(ARRAY(
        SELECT n::claims FROM new_claims n JOIN old_claims o USING (claim_id)
         WHERE (n.activity_id, n.exclusivity_group, n.slot_no, n.member_id)
               IS DISTINCT FROM (o.activity_id, o.exclusivity_group, o.slot_no, o.member_id)));
    RETURN NULL;
END $$;

CREATE FUNCTION activities_claimed_check() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.activity_id = OLD.activity_id THEN
        IF NEW.exclusivity_group IS DISTINCT FROM OLD.exclusivity_group THEN
            UPDATE claims SET exclusivity_group = NEW.exclusivity_group
             WHERE activity_id = NEW.activity_id AND exclusivity_group = OLD.exclusivity_group;
        END IF;
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM claims c
                WHERE c.activity_id = OLD.activity_id AND c.exclusivity_group = OLD.exclusivity_group) THEN
        RAISE EXCEPTION 'activity % has claims', OLD.activity_id
              USING ERRCODE = 'foreign_key_violation', TABLE = 'activities',
                    CONSTRAINT = 'claims_activity_group_fkey';
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION package_slots_claimed_check() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND (NEW.activity_id, NEW.slot_no) = (OLD.activity_id, OLD.slot_no) THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM claims c WHERE c.activity_id = OLD.activity_id AND c.slot_no = OLD.slot_no) THEN
        RAISE EXCEPTION 'package slot % of activity % is held by a claim', OLD.slot_no, OLD.activity_id
              USING ERRCODE = 'foreign_key_violation', TABLE = 'package_slots', CONSTRAINT = 'claims_slot_fkey';
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION members_claimed_check() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.member_id = OLD.member_id THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM claims c WHERE c.member_id = OLD.member_id) THEN
        RAISE EXCEPTION 'member % has claims', OLD.member_id
              USING ERRCODE = 'foreign_key_violation', TABLE = 'members', CONSTRAINT = 'claims_member_id_fkey';
    END IF;
    RETURN NULL;
END $$;
"""

TRIGGERS = """
CREATE TRIGGER claims_inserted_check AFTER INSERT ON claims
    REFERENCING NEW TABLE AS new_claims FOR EACH STATEMENT EXECUTE FUNCTION claims_inserted_check();
CREATE TRIGGER claims_updated_check AFTER UPDATE ON claims
    REFERENCING OLD TABLE AS old_claims NEW TABLE AS new_claims
    FOR EACH STATEMENT EXECUTE FUNCTION claims_updated_check();
CREATE TRIGGER activities_claimed_check AFTER DELETE OR UPDATE OF activity_id, exclusivity_group ON activities
    FOR EACH ROW EXECUTE FUNCTION activities_claimed_check();
CREATE TRIGGER package_slots_claimed_check AFTER DELETE OR UPDATE OF activity_id, slot_no ON package_slots
    FOR EACH ROW EXECUTE FUNCTION package_slots_claimed_check();
CREATE TRIGGER members_claimed_check AFTER DELETE OR UPDATE OF member_id ON members
    FOR EACH ROW EXECUTE FUNCTION members_claimed_check();
"""

DROP = """
DROP TRIGGER members_claimed_check ON members;
DROP TRIGGER package_slots_claimed_check ON package_slots;
DROP TRIGGER activities_claimed_check ON activities;
DROP TRIGGER claims_updated_check ON claims;
DROP TRIGGER claims_inserted_check ON claims;
DROP FUNCTION members_claimed_check();
DROP FUNCTION package_slots_claimed_check();
DROP FUNCTION activities_claimed_check();
DROP FUNCTION claims_updated_check();
DROP FUNCTION claims_inserted_check();
DROP FUNCTION claims_keys_check(claims[]);
"""


def upgrade() -> None:
    op.drop_constraint("claims_id_member_key", "claims", type_="unique")
    op.drop_constraint("claims_activity_group_fkey", "claims", type_="foreignkey")
    op.drop_constraint("claims_slot_fkey", "claims", type_="foreignkey")
    op.drop_constraint("claims_member_id_fkey", "claims", type_="foreignkey")
    op.execute(sa.text(FUNCTIONS))
    op.execute(sa.text(TRIGGERS))
    op.drop_constraint("members_app_member_id_key", "members", type_="unique")
    op.create_index(
        "members_app_member_id_key",
        "members",
        ["app_member_id"],
        unique=True,
        postgresql_where=sa.text("app_member_id IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("members_app_member_id_key", "members")
    op.create_unique_constraint("members_app_member_id_key", "members", ["app_member_id"])
    op.execute(sa.text(DROP))
    op.create_foreign_key("claims_member_id_fkey", "claims", "members", ["member_id"], ["member_id"])
    op.create_foreign_key(
        "claims_slot_fkey", "claims", "package_slots", ["activity_id", "slot_no"], ["activity_id", "slot_no"]
    )
    op.create_foreign_key(
        "claims_activity_group_fkey",
        "claims",
        "activities",
        ["activity_id", "exclusivity_group"],
        ["activity_id", "exclusivity_group"],
        onupdate="CASCADE",
    )
    op.create_unique_constraint("claims_id_member_key", "claims", ["claim_id", "member_id"])
