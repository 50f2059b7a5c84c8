-- One account as the query API reads it, in one statement and one round trip instead of four
-- (BEGIN; set_config of role and tenant; SELECT; ROLLBACK), with the same two walls between
-- tenants: the query's own `tenant` filter, and row-level security as `ledger_tenant_reader`
-- with `ledger.tenant` set.
--
-- SECURITY INVOKER on purpose: a SECURITY DEFINER function would read as its owner, who
-- bypasses row-level security, and may not `SET role` either. The `SET` clauses switch the
-- role for the call (the caller must be a member of the reader role, or a superuser, as for
-- the query API's other reads) and undo both settings when it returns, so that neither the
-- role nor the tenant outlives the call, not even inside a caller's transaction. The SELECT
-- is planned after the switch, so row-level security applies to the reader role.
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
    SET role = ledger_tenant_reader
    SET ledger.tenant = ''
AS $$
BEGIN
    PERFORM set_config('ledger.tenant', wanted_tenant, true);
    RETURN QUERY
        SELECT a.id, a.owner, a.currency, a.balance, a.overdraft_limit, a.status, a.version,
               a.opened_at, a.updated_at
          FROM accounts a
         WHERE a.id = wanted_id AND a.tenant = wanted_tenant;
END
$$;

REVOKE ALL ON FUNCTION ledger_account(text, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ledger_account(text, uuid) TO ledger_tenant_reader;
