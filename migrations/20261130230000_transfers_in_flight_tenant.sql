-- Whose transfers are in flight, so that the command API can refuse a tenant that holds its
-- share of them (`COMMAND_API_MAX_TRANSFERS_IN_FLIGHT_PER_TENANT`) while admitting the others:
-- without it, one tenant requesting transfers as fast as it can filled the whole pile, and
-- every other tenant's transfers were refused until the process manager had worked it off.
ALTER TABLE transfers_in_flight ADD COLUMN tenant text NOT NULL DEFAULT '';

UPDATE transfers_in_flight t
   SET tenant = coalesce(e.tenant, '')
  FROM events e
 WHERE e.aggregate_type = 'transfer' AND e.aggregate_id = t.transfer_id AND e.sequence = 1;

ALTER TABLE transfers_in_flight ALTER COLUMN tenant DROP DEFAULT;

CREATE OR REPLACE FUNCTION track_transfers_in_flight() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS
$$
BEGIN
    IF NEW.event_type IN ('TransferCompleted', 'TransferRejected', 'TransferFailed') THEN
        DELETE FROM transfers_in_flight WHERE transfer_id = NEW.aggregate_id;
    ELSE
        INSERT INTO transfers_in_flight (transfer_id, tenant, last_event_at)
        VALUES (NEW.aggregate_id, coalesce(NEW.tenant, ''), NEW.recorded_at)
        ON CONFLICT (transfer_id) DO UPDATE SET last_event_at = EXCLUDED.last_event_at;
    END IF;
    RETURN NULL;
END
$$;
