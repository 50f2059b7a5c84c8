-- Least privilege: each service connects as a login role that is a member of one of these,
-- and only the owner (who runs the migrations) can change the schema or rewrite history.
--
--   ledger_writer         command API, relay, process manager: read and append the event
--                         store, move the relay's checkpoint; no UPDATE, DELETE or TRUNCATE
--                         of events, and (not being the owner) no ALTER TABLE, so the
--                         append-only trigger stays on.
--   ledger_projector      projector: read the event store, write the read models.
--   ledger_tenant_reader  query API: read one tenant's rows (row-level security).
--
-- The roles are created when missing and the owner may create them; otherwise a DBA creates
-- them first (README.md, "Database roles"). Nothing here is created twice.
DO $$
DECLARE
    name text;
BEGIN
    FOREACH name IN ARRAY ARRAY['ledger_writer', 'ledger_projector', 'ledger_tenant_reader'] LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = name) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', name);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
    END LOOP;
END
$$;

REVOKE ALL ON events, log_checkpoints FROM PUBLIC;
-- Only the columns an append writes: the log's position (tx_id, global_position), the event's
-- id and time, and the hash chain come from defaults and the trigger, never from a writer.
GRANT SELECT ON events TO ledger_writer;
GRANT INSERT (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
    ON events TO ledger_writer;
GRANT SELECT, INSERT, UPDATE ON log_checkpoints TO ledger_writer;
GRANT SELECT ON events TO ledger_projector;
GRANT SELECT, INSERT, UPDATE, DELETE ON projector_parked_streams TO ledger_projector;
-- Services check on start-up that the schema is as new as their build.
GRANT SELECT ON _sqlx_migrations TO ledger_writer, ledger_projector, ledger_tenant_reader;

-- The read models again after `projector rebuild` swapped in fresh tables.
CREATE OR REPLACE FUNCTION ledger_protect_read_models() RETURNS void
    LANGUAGE plpgsql AS
$$
DECLARE
    read_model text;
BEGIN
    FOREACH read_model IN ARRAY ARRAY['accounts', 'account_entries', 'transfers'] LOOP
        EXECUTE format('GRANT SELECT ON %I TO ledger_tenant_reader', read_model);
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I TO ledger_projector', read_model);
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', read_model);
        EXECUTE format('DROP POLICY IF EXISTS tenant_rows ON %I', read_model);
        EXECUTE format(
            'CREATE POLICY tenant_rows ON %I FOR SELECT TO ledger_tenant_reader
                USING (tenant = current_setting(''ledger.tenant'', true))',
            read_model);
        -- Row-level security restricts every role but the owner: the projector sees all rows.
        EXECUTE format('DROP POLICY IF EXISTS projector_rows ON %I', read_model);
        EXECUTE format(
            'CREATE POLICY projector_rows ON %I TO ledger_projector USING (true) WITH CHECK (true)',
            read_model);
    END LOOP;
END
$$;

SELECT ledger_protect_read_models();

CREATE POLICY projector_rows ON events FOR SELECT TO ledger_projector USING (true);
CREATE POLICY writer_rows ON events TO ledger_writer USING (true) WITH CHECK (true);

-- The relay reports the oldest open transaction from pg_stat_activity, which shows other
-- sessions' transactions only to pg_monitor's members. Granting it takes a superuser; a
-- DBA does it otherwise (README.md, "Database roles").
DO $$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        GRANT pg_monitor TO ledger_writer;
    END IF;
END
$$;
