-- `ledger_account` without the role switch when its caller already is the reader role: the
-- query API's kept account-read connections take `ledger_tenant_reader` for their whole
-- session (`KeptConnections::acting_as`), so the switch and its undoing, about a fifth of
-- Postgres's CPU per read, happen once per connection instead of once per read. Any other
-- caller is switched for the call as before: a member login that did not switch, and an owner
-- or a superuser, who would otherwise bypass row-level security. The tenant is set for every
-- call either way and put back before it returns. The role's name is `db::TENANT_READER_ROLE`.
CREATE OR REPLACE FUNCTION ledger_account(wanted_tenant text, wanted_id uuid)
    RETURNS TABLE (
        id uuid, owner text, currency text, balance bigint, overdraft_limit bigint,
        status text, version bigint, opened_at timestamptz, updated_at timestamptz
    )
    LANGUAGE plpgsql
AS $$
DECLARE
    -- NULL when the caller reads as the reader role already.
    caller_role text;
    caller_tenant text := coalesce(current_setting('ledger.tenant', true), '');
BEGIN
    IF current_user = 'ledger_tenant_reader' THEN
        PERFORM set_config('ledger.tenant', wanted_tenant, true);
    ELSE
        caller_role := current_setting('role');
        PERFORM set_config('role', 'ledger_tenant_reader', true),
                set_config('ledger.tenant', wanted_tenant, true);
    END IF;
    RETURN QUERY
        SELECT a.id, a.owner, a.currency, a.balance, a.overdraft_limit, a.status, a.version,
               a.opened_at, a.updated_at
          FROM accounts a
         WHERE a.id = wanted_id AND a.tenant = wanted_tenant;
    PERFORM set_config('ledger.tenant', caller_tenant, true);
    IF caller_role IS NOT NULL THEN
        PERFORM set_config('role', caller_role, true);
    END IF;
END
$$;
