-- Least-privilege roles for the issuance database. Run as a superuser (or
-- the database owner) in the issuance database: once to create the roles,
-- and again after a migration adds a table (every statement is idempotent).
-- Passwords are not set here: \password <role> in psql, then each process
-- reads its own from its passfile (deploy/systemd/*.env).
--
--   issuance_migrate  owns the schema; only `issuance db upgrade` uses it
--   issuance_worker   reads and writes rows (workers, sweeper, dead letters)
--   issuance_page     reads what the activity page shows; writes nothing but
--                     the phone key fingerprint on first start
--   issuance_reader   reads everything (the exporter, reports)
DO $$
DECLARE
    name text;
BEGIN
    FOREACH name IN ARRAY ARRAY['issuance_migrate', 'issuance_worker', 'issuance_page', 'issuance_reader'] LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = name) THEN
            EXECUTE format('CREATE ROLE %I LOGIN', name);
        END IF;
    END LOOP;
END
$$;

REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO issuance_migrate;
GRANT USAGE ON SCHEMA public TO issuance_worker, issuance_page, issuance_reader;

-- Tables the migrations create from now on.
ALTER DEFAULT PRIVILEGES FOR ROLE issuance_migrate IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO issuance_worker;
ALTER DEFAULT PRIVILEGES FOR ROLE issuance_migrate IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO issuance_worker;
ALTER DEFAULT PRIVILEGES FOR ROLE issuance_migrate IN SCHEMA public
    GRANT SELECT ON TABLES TO issuance_reader;

-- Tables that exist already.
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO issuance_worker;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO issuance_worker;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO issuance_reader;

-- The page: exactly the tables of producers/issuance/producers/web/queries.py
-- and the phone key check (an insert that never overwrites: ON CONFLICT DO
-- NOTHING), nothing else. A stolen page credential reads activities and
-- claim states; it cannot grant, bind, credit or delete.
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM issuance_page;
GRANT SELECT ON activities, coupon_templates, claims, codes, held_credits, key_fingerprints TO issuance_page;
GRANT INSERT ON key_fingerprints TO issuance_page;
