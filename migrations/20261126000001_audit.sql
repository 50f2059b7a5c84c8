-- Auditors read one tenant's log in commit order (`GET /v1/audit/log`, `ledger-audit`): the
-- same order as `events_commit_order`, within a tenant, so a page is an index range scan
-- however many other tenants share the table.
CREATE INDEX events_tenant_commit_order
    ON events ((metadata ->> 'tenant'), tx_id, global_position);
