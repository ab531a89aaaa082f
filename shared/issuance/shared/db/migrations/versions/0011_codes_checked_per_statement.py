"""codes at the speed of COPY: the keys of codes and of wallet entries are
checked once per statement over the rows it wrote, not by a trigger per row;
no second unique index on the code

Revision ID: 0011
Revises: 0009
Create Date: 2026-11-30 08:20:00

A generated code used to cost two B-tree entries keyed by the random code
(the primary key and the unique (code, claim_id, member_id) key that the
wallet's foreign key pointed at), a third entry for (claim_id, template_id),
and five foreign-key trigger events (batch, template, claim, rebate, order),
three of which only found NULLs. Now the invariants are held as follows:

- a code is unique: its primary key (unchanged);
- a code belongs to a batch of its own template, and a bound code to a claim
  or rebate of its member, a used one to an order: checked by one query per
  INSERT or UPDATE statement over its transition table, which also takes the
  KEY SHARE locks a foreign key takes; the referenced rows (batches, claims,
  rebates, orders) cannot be deleted or re-keyed while a code names them;
- a code is bound at most once: its code, batch and template never change,
  and once a code has a member its owner (claim or rebate and member) never
  changes; a claim holds one code per template (a unique index over bound
  codes only);
- a wallet entry is the binding of its code: checked per statement, and a
  bound code that a wallet entry names cannot be deleted.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

CODE_FOREIGN_KEYS = (
    "codes_batch_id_fkey",
    "codes_template_id_fkey",
    "codes_claim_member_fkey",
    "codes_rebate_member_fkey",
    "codes_order_id_fkey",
)

FUNCTIONS = r"""
CREATE FUNCTION codes_inserted_check() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    seen record;
BEGIN
    -- One pass over the statement's rows: a COPY chunk of generated codes has
    -- one batch of one template and no owner.
    SELECT min(batch_id) AS first_batch, max(batch_id) AS last_batch,
           min(template_id) AS first_template, max(template_id) AS last_template,
           count(*) FILTER (WHERE member_id IS NOT NULL OR order_id IS NOT NULL) AS owned
      INTO seen FROM new_codes;
    IF seen.first_batch = seen.last_batch AND seen.first_template = seen.last_template THEN
        PERFORM 1 FROM code_batches b
         WHERE b.batch_id = seen.first_batch AND b.template_id = seen.first_template FOR KEY SHARE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'a code must belong to a batch of its own template'
                  USING ERRCODE = 'foreign_key_violation', TABLE = 'codes', CONSTRAINT = 'codes_batch_check';
        END IF;
    ELSE
        PERFORM 1 FROM code_batches b
         WHERE (b.batch_id, b.template_id) IN (SELECT DISTINCT batch_id, template_id FROM new_codes)
           FOR KEY SHARE;
        IF EXISTS (
            SELECT 1 FROM (SELECT DISTINCT batch_id, template_id FROM new_codes) n
             WHERE NOT EXISTS (
                   SELECT 1 FROM code_batches b
                    WHERE b.batch_id = n.batch_id AND b.template_id = n.template_id))
        THEN
            RAISE EXCEPTION 'a code must belong to a batch of its own template'
                  USING ERRCODE = 'foreign_key_violation', TABLE = 'codes', CONSTRAINT = 'codes_batch_check';
        END IF;
    END IF;
    IF seen.owned > 0 THEN
        PERFORM codes_owners_check(ARRAY(
            SELECT ROW(n.code, n.member_id, n.claim_id, n.rebate_id, n.order_id)::codes_owner
              FROM new_codes n
             WHERE n.member_id IS NOT NULL OR n.order_id IS NOT NULL));
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION codes_updated_check() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Codes, batches, templates and owners never change (codes_frozen_check),
    -- so only owners set from NULL and orders set anew need a look.
    PERFORM codes_owners_check(ARRAY(
        SELECT ROW(n.code,
                   CASE WHEN o.member_id IS NULL THEN n.member_id END,
                   CASE WHEN o.member_id IS NULL THEN n.claim_id END,
                   CASE WHEN o.member_id IS NULL THEN n.rebate_id END,
                   CASE WHEN n.order_id IS DISTINCT FROM o.order_id THEN n.order_id END)::codes_owner
          FROM new_codes n JOIN old_codes o USING (code)
         WHERE (o.member_id IS NULL AND n.member_id IS NOT NULL)
            OR (n.order_id IS NOT NULL AND n.order_id IS DISTINCT FROM o.order_id)));
    RETURN NULL;
END $$;

-- Each row is looked up through its key's index and locked as a foreign key
-- locks it (a correlated subquery: not turned into a join that could scan the
-- referenced table).
CREATE FUNCTION codes_owners_check(owners codes_owner[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF cardinality(owners) = 0 THEN
        RETURN;
    END IF;
    IF EXISTS (
        SELECT 1 FROM unnest(owners) w
         WHERE (w.claim_id IS NOT NULL AND w.member_id IS NOT NULL AND (
                    SELECT 1 FROM claims k WHERE k.claim_id = w.claim_id AND k.member_id = w.member_id
                       FOR KEY SHARE) IS NULL)
            OR (w.rebate_id IS NOT NULL AND w.member_id IS NOT NULL AND (
                    SELECT 1 FROM rebates r WHERE r.rebate_id = w.rebate_id AND r.referrer_member_id = w.member_id
                       FOR KEY SHARE) IS NULL)
            OR (w.order_id IS NOT NULL AND (
                    SELECT 1 FROM orders x WHERE x.order_id = w.order_id FOR KEY SHARE) IS NULL))
    THEN
        RAISE EXCEPTION 'a code names a claim, rebate or order that does not exist'
              USING ERRCODE = 'foreign_key_violation', TABLE = 'codes', CONSTRAINT = 'codes_owner_check';
    END IF;
END $$;

CREATE FUNCTION codes_frozen_check() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'code %: its code, batch, template and owner never change once set', OLD.code
          USING ERRCODE = 'check_violation', TABLE = 'codes', CONSTRAINT = 'codes_bound_once_check';
END $$;

CREATE FUNCTION codes_credited_delete_check() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM wallet_ledger w WHERE w.claim_id = OLD.claim_id AND w.code = OLD.code) THEN
        RAISE EXCEPTION 'code % is in a wallet', OLD.code
              USING ERRCODE = 'foreign_key_violation', TABLE = 'codes', CONSTRAINT = 'wallet_code_binding_check';
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION wallet_binding_check() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM new_entries n
         WHERE (SELECT 1 FROM codes c
                 WHERE c.code = n.code AND c.claim_id = n.claim_id AND c.member_id = n.member_id
                   FOR KEY SHARE) IS NULL)
    THEN
        RAISE EXCEPTION 'a wallet entry must be the binding of its code (code, claim, member)'
              USING ERRCODE = 'foreign_key_violation', TABLE = 'wallet_ledger',
                    CONSTRAINT = 'wallet_code_binding_check';
    END IF;
    RETURN NULL;
END $$;

-- The rows codes name: refused while a code names them (checked after the
-- row is changed, so a code written meanwhile by a transaction holding the
-- KEY SHARE lock is seen).
CREATE FUNCTION code_batches_referenced_check() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND (NEW.batch_id, NEW.template_id) = (OLD.batch_id, OLD.template_id) THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM codes c WHERE c.batch_id = OLD.batch_id) THEN
        RAISE EXCEPTION 'batch % has codes', OLD.batch_id
              USING ERRCODE = 'foreign_key_violation', TABLE = 'code_batches', CONSTRAINT = 'codes_batch_check';
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION claims_referenced_check() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND (NEW.claim_id, NEW.member_id) IS NOT DISTINCT FROM (OLD.claim_id, OLD.member_id) THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM codes c WHERE c.claim_id = OLD.claim_id AND c.member_id = OLD.member_id) THEN
        RAISE EXCEPTION 'claim % has codes', OLD.claim_id
              USING ERRCODE = 'foreign_key_violation', TABLE = 'claims', CONSTRAINT = 'codes_owner_check';
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION rebates_referenced_check() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE'
       AND (NEW.rebate_id, NEW.referrer_member_id) = (OLD.rebate_id, OLD.referrer_member_id) THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM codes c
                WHERE c.rebate_id = OLD.rebate_id AND c.member_id = OLD.referrer_member_id) THEN
        RAISE EXCEPTION 'rebate % has a code', OLD.rebate_id
              USING ERRCODE = 'foreign_key_violation', TABLE = 'rebates', CONSTRAINT = 'codes_owner_check';
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION orders_referenced_check() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.order_id = OLD.order_id THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM codes c WHERE c.order_id = OLD.order_id) THEN
        RAISE EXCEPTION 'order % has coupons', OLD.order_id
              USING ERRCODE = 'foreign_key_violation', TABLE = 'orders', CONSTRAINT = 'codes_owner_check';
    END IF;
    RETURN NULL;
END $$;
"""

TRIGGERS = """
CREATE TRIGGER codes_inserted_check AFTER INSERT ON codes
    REFERENCING NEW TABLE AS new_codes FOR EACH STATEMENT EXECUTE FUNCTION codes_inserted_check();
CREATE TRIGGER codes_updated_check AFTER UPDATE ON codes
    REFERENCING OLD TABLE AS old_codes NEW TABLE AS new_codes
    FOR EACH STATEMENT EXECUTE FUNCTION codes_updated_check();
CREATE TRIGGER codes_frozen_check BEFORE UPDATE ON codes FOR EACH ROW
    WHEN (NEW.code <> OLD.code OR NEW.batch_id <> OLD.batch_id OR NEW.template_id <> OLD.template_id
          OR (OLD.member_id IS NOT NULL AND (NEW.member_id, NEW.claim_id, NEW.rebate_id)
              IS DISTINCT FROM (OLD.member_id, OLD.claim_id, OLD.rebate_id)))
    EXECUTE FUNCTION codes_frozen_check();
CREATE TRIGGER codes_credited_delete_check AFTER DELETE ON codes FOR EACH ROW
    WHEN (OLD.claim_id IS NOT NULL) EXECUTE FUNCTION codes_credited_delete_check();
CREATE TRIGGER wallet_inserted_check AFTER INSERT ON wallet_ledger
    REFERENCING NEW TABLE AS new_entries FOR EACH STATEMENT EXECUTE FUNCTION wallet_binding_check();
CREATE TRIGGER wallet_updated_check AFTER UPDATE ON wallet_ledger
    REFERENCING NEW TABLE AS new_entries FOR EACH STATEMENT EXECUTE FUNCTION wallet_binding_check();
CREATE TRIGGER code_batches_referenced_check AFTER DELETE OR UPDATE OF batch_id, template_id ON code_batches
    FOR EACH ROW EXECUTE FUNCTION code_batches_referenced_check();
CREATE TRIGGER claims_referenced_check AFTER DELETE OR UPDATE OF claim_id, member_id ON claims
    FOR EACH ROW EXECUTE FUNCTION claims_referenced_check();
CREATE TRIGGER rebates_referenced_check AFTER DELETE OR UPDATE OF rebate_id, referrer_member_id ON rebates
    FOR EACH ROW EXECUTE FUNCTION rebates_referenced_check();
CREATE TRIGGER orders_referenced_check AFTER DELETE OR UPDATE OF order_id ON orders
    FOR EACH ROW EXECUTE FUNCTION orders_referenced_check();
"""

DROP = """
DROP TRIGGER orders_referenced_check ON orders;
DROP TRIGGER rebates_referenced_check ON rebates;
DROP TRIGGER claims_referenced_check ON claims;
DROP TRIGGER code_batches_referenced_check ON code_batches;
DROP TRIGGER wallet_updated_check ON wallet_ledger;
DROP TRIGGER wallet_inserted_check ON wallet_ledger;
DROP TRIGGER codes_credited_delete_check ON codes;
DROP TRIGGER codes_frozen_check ON codes;
DROP TRIGGER codes_updated_check ON codes;
DROP TRIGGER codes_inserted_check ON codes;
DROP FUNCTION orders_referenced_check();
DROP FUNCTION rebates_referenced_check();
DROP FUNCTION claims_referenced_check();
DROP FUNCTION code_batches_referenced_check();
DROP FUNCTION wallet_binding_check();
DROP FUNCTION codes_credited_delete_check();
DROP FUNCTION codes_frozen_check();
DROP FUNCTION codes_updated_check();
DROP FUNCTION codes_inserted_check();
DROP FUNCTION codes_owners_check(codes_owner[]);
DROP TYPE codes_owner;
"""

BOUND = sa.text("claim_id IS NOT NULL")


def upgrade() -> None:
    op.drop_constraint("wallet_code_binding_fkey", "wallet_ledger", type_="foreignkey")
    op.drop_constraint("codes_binding_key", "codes", type_="unique")
    for name in CODE_FOREIGN_KEYS:
        op.drop_constraint(name, "codes", type_="foreignkey")
    # Only bound codes have a claim: available ones no longer add an entry.
    op.drop_constraint("codes_one_per_template_key", "codes", type_="unique")
    op.create_index(
        "codes_one_per_template_key",
        "codes",
        ["claim_id", "template_id"],
        unique=True,
        postgresql_where=BOUND,
    )
    op.execute(
        "CREATE TYPE codes_owner AS"
        " (code varchar(16), member_id bigint, claim_id uuid, rebate_id bigint, order_id varchar(64))"
    )
    op.execute(FUNCTIONS)
    op.execute(TRIGGERS)


def downgrade() -> None:
    op.execute(DROP)
    op.drop_index("codes_one_per_template_key", table_name="codes", postgresql_where=BOUND)
    op.create_unique_constraint("codes_one_per_template_key", "codes", ["claim_id", "template_id"])
    op.create_foreign_key("codes_order_id_fkey", "codes", "orders", ["order_id"], ["order_id"])
    op.create_foreign_key(
        "codes_rebate_member_fkey",
        "codes",
        "rebates",
        ["rebate_id", "member_id"],
        ["rebate_id", "referrer_member_id"],
    )
    op.create_foreign_key(
        "codes_claim_member_fkey", "codes", "claims", ["claim_id", "member_id"], ["claim_id", "member_id"]
    )
    op.create_foreign_key(
        "codes_template_id_fkey", "codes", "coupon_templates", ["template_id"], ["template_id"]
    )
    op.create_foreign_key("codes_batch_id_fkey", "codes", "code_batches", ["batch_id"], ["batch_id"])
    op.create_unique_constraint("codes_binding_key", "codes", ["code", "claim_id", "member_id"])
    op.create_foreign_key(
        "wallet_code_binding_fkey",
        "wallet_ledger",
        "codes",
        ["code", "claim_id", "member_id"],
        ["code", "claim_id", "member_id"],
    )
