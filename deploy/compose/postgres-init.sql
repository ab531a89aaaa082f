-- Run once by the postgres image on an empty data directory: the roles of
-- deploy/postgresql/roles.sql, with development passwords (this file is for
-- the local compose cluster only). Their privileges on the tables are
-- granted by the `grants` service, which runs deploy/postgresql/roles.sql
-- after the migrations created the tables.
CREATE ROLE issuance_migrate LOGIN PASSWORD 'migrate-dev';
CREATE ROLE issuance_worker LOGIN PASSWORD 'worker-dev';
CREATE ROLE issuance_page LOGIN PASSWORD 'page-dev';
CREATE ROLE issuance_reader LOGIN PASSWORD 'reader-dev';
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO issuance_migrate;
