-- An event's tenant as a column of its own, so the indexes, the row-level security policy and
-- every reader name `tenant` instead of parsing the metadata text again. Generated from the
-- metadata (which the hash chain covers), so no writer can make the two disagree, and writers,
-- postgres-es's INSERTs included, need not change. Adding a stored generated column rewrites
-- the table once, at this migration.
ALTER TABLE events ADD COLUMN tenant text GENERATED ALWAYS AS (metadata ->> 'tenant') STORED;

DROP INDEX events_idempotency_key;
CREATE UNIQUE INDEX events_idempotency_key
    ON events (tenant, (metadata ->> 'idempotency_key'))
    WHERE (metadata ->> 'idempotency_key') IS NOT NULL;

DROP INDEX events_tenant_commit_order;
CREATE INDEX events_tenant_commit_order ON events (tenant, tx_id, global_position);

DROP POLICY tenant_rows ON events;
CREATE POLICY tenant_rows ON events FOR SELECT TO ledger_tenant_reader
    USING (tenant = current_setting('ledger.tenant', true));
