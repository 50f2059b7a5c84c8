-- A second wall between tenants, behind the `WHERE tenant = ...` of every query: the query API
-- reads as `ledger_tenant_reader` with `ledger.tenant` set for its transaction, and row-level
-- security lets that role see its tenant's rows only, so even a query that forgot its filter
-- cannot return another tenant's row. Writers (the projector, the command side) keep their
-- own role; a superuser bypasses row-level security, so only the reader role is constrained.

-- Roles belong to the cluster, not the database: another database may have created it, and
-- two migrating at once may race. Created only if missing, so that an owner without
-- CREATEROLE migrates once a DBA created the roles (README.md, "Database roles").
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ledger_tenant_reader') THEN
        CREATE ROLE ledger_tenant_reader NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

-- Applied here and again by `projector rebuild`, whose swapped-in tables start without
-- grants or policies.
CREATE FUNCTION ledger_protect_read_models() RETURNS void
    LANGUAGE plpgsql AS
$$
DECLARE
    read_model text;
BEGIN
    FOREACH read_model IN ARRAY ARRAY['accounts', 'account_entries', 'transfers'] LOOP
        EXECUTE format('GRANT SELECT ON %I TO ledger_tenant_reader', read_model);
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', read_model);
        EXECUTE format('DROP POLICY IF EXISTS tenant_rows ON %I', read_model);
        EXECUTE format(
            'CREATE POLICY tenant_rows ON %I FOR SELECT TO ledger_tenant_reader
                USING (tenant = current_setting(''ledger.tenant'', true))',
            read_model);
    END LOOP;
END
$$;

SELECT ledger_protect_read_models();

GRANT SELECT ON events TO ledger_tenant_reader;
ALTER TABLE events ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON events FOR SELECT TO ledger_tenant_reader
    USING ((metadata ->> 'tenant') = current_setting('ledger.tenant', true));
