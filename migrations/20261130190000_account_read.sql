-- One account as the query API reads it, in one statement and one round trip instead of four
-- (BEGIN; set_config of role and tenant; SELECT; ROLLBACK), with the same two walls between
-- tenants: the query's own `tenant` filter, and row-level security as `ledger_tenant_reader`
-- with `ledger.tenant` set.
--
-- SECURITY INVOKER on purpose: a SECURITY DEFINER function would read as its owner, who
-- bypasses row-level security. The role and the tenant are set in the body, not by `SET`
-- clauses on the function: those are checked against the function's owner when it is
-- created, and an owner need not be a member of the reader role (the caller must be, or a
-- superuser, as for the query API's other reads). The SELECT is planned after the switch, so
-- row-level security applies to the reader role. The body puts both settings back as they
-- were before it returns, so that neither outlives the call, not even inside a caller's
-- transaction; if the SELECT fails, the failed (sub)transaction undoes them.
--
-- The columns are spelled out rather than `SETOF accounts`: `projector rebuild` swaps in a new
-- `accounts` table and drops the old one, which a function returning the old row type would
-- pin. The body names `accounts` and is planned anew when the table is swapped.
CREATE FUNCTION ledger_account(wanted_tenant text, wanted_id uuid)
    RETURNS TABLE (
        id uuid, owner text, currency text, balance bigint, overdraft_limit bigint,
        status text, version bigint, opened_at timestamptz, updated_at timestamptz
    )
    LANGUAGE plpgsql
AS $$
DECLARE
    caller_role text := current_setting('role');
    caller_tenant text := coalesce(current_setting('ledger.tenant', true), '');
BEGIN
    PERFORM set_config('role', 'ledger_tenant_reader', true),
            set_config('ledger.tenant', wanted_tenant, true);
    RETURN QUERY
        SELECT a.id, a.owner, a.currency, a.balance, a.overdraft_limit, a.status, a.version,
               a.opened_at, a.updated_at
          FROM accounts a
         WHERE a.id = wanted_id AND a.tenant = wanted_tenant;
    PERFORM set_config('role', caller_role, true),
            set_config('ledger.tenant', caller_tenant, true);
END
$$;

REVOKE ALL ON FUNCTION ledger_account(text, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ledger_account(text, uuid) TO ledger_tenant_reader;
