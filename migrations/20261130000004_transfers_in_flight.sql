-- The transfers not yet final, kept beside the log in the same statement that appends their
-- events, so that finding the stuck ones costs work in proportion to the transfers in flight,
-- not to every transfer event ever written. A row trigger keeps it: an event of a transfer
-- stream marks its transfer in flight (as of that event), a final one removes it. SECURITY
-- DEFINER so that writers need no privileges on the table beyond reading it.
CREATE TABLE transfers_in_flight (
    transfer_id   text        PRIMARY KEY,
    last_event_at timestamptz NOT NULL
);
CREATE INDEX transfers_in_flight_by_age ON transfers_in_flight (last_event_at);

CREATE FUNCTION track_transfers_in_flight() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS
$$
BEGIN
    IF NEW.event_type IN ('TransferCompleted', 'TransferRejected', 'TransferFailed') THEN
        DELETE FROM transfers_in_flight WHERE transfer_id = NEW.aggregate_id;
    ELSE
        INSERT INTO transfers_in_flight (transfer_id, last_event_at)
        VALUES (NEW.aggregate_id, NEW.recorded_at)
        ON CONFLICT (transfer_id) DO UPDATE SET last_event_at = EXCLUDED.last_event_at;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_transfers_in_flight
    AFTER INSERT ON events
    FOR EACH ROW WHEN (NEW.aggregate_type = 'transfer')
    EXECUTE FUNCTION track_transfers_in_flight();

INSERT INTO transfers_in_flight (transfer_id, last_event_at)
SELECT aggregate_id, max(recorded_at)
  FROM events
 WHERE aggregate_type = 'transfer'
 GROUP BY aggregate_id
HAVING bool_and(event_type NOT IN ('TransferCompleted', 'TransferRejected', 'TransferFailed'));

REVOKE ALL ON transfers_in_flight FROM PUBLIC;
REVOKE ALL ON FUNCTION track_transfers_in_flight() FROM PUBLIC;
GRANT SELECT ON transfers_in_flight TO ledger_writer;
