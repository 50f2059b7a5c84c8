-- The database roles of a Ledger deployment, for a DBA to run once per cluster, before the
-- first migration (README.md, "Database roles"). Idempotent: run it again to add what is
-- missing; it never changes an existing role's password.
--
--   LEDGER_OWNER_PASSWORD=... LEDGER_WRITER_PASSWORD=... LEDGER_PROJECTOR_PASSWORD=... \
--   LEDGER_QUERY_PASSWORD=... psql -v ON_ERROR_STOP=1 -d ledger -f deploy/postgres/roles.sql
--
-- Logins: ledger_owner owns the schema and runs the migrations (`command-api migrate`);
-- ledger_command (command API, relay, process manager), ledger_projection (projector) and
-- ledger_query (query API) each hold one group role, whose privileges the migrations grant.
\getenv owner_password LEDGER_OWNER_PASSWORD
\getenv writer_password LEDGER_WRITER_PASSWORD
\getenv projector_password LEDGER_PROJECTOR_PASSWORD
\getenv query_password LEDGER_QUERY_PASSWORD

SELECT 'CREATE ROLE ledger_writer NOLOGIN'
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ledger_writer') \gexec
SELECT 'CREATE ROLE ledger_projector NOLOGIN'
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ledger_projector') \gexec
SELECT 'CREATE ROLE ledger_tenant_reader NOLOGIN'
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ledger_tenant_reader') \gexec

SELECT format('CREATE ROLE ledger_owner LOGIN PASSWORD %L', :'owner_password')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ledger_owner') \gexec
SELECT format('CREATE ROLE ledger_command LOGIN PASSWORD %L IN ROLE ledger_writer', :'writer_password')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ledger_command') \gexec
SELECT format('CREATE ROLE ledger_projection LOGIN PASSWORD %L IN ROLE ledger_projector', :'projector_password')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ledger_projection') \gexec
SELECT format('CREATE ROLE ledger_query LOGIN PASSWORD %L IN ROLE ledger_tenant_reader', :'query_password')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ledger_query') \gexec

-- The owner owns the database (and so, from Postgres 15, may create in its public schema).
SELECT format('ALTER DATABASE %I OWNER TO ledger_owner', current_database()) \gexec
-- The relay's oldest-open-transaction gauge reads other sessions' transactions.
GRANT pg_monitor TO ledger_writer;
