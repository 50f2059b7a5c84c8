-- The latest snapshot of each stream's state. A load reads the snapshot and the events after
-- it, so its cost follows the events since the last snapshot, not the stream's length. Only a
-- cache of the log, never a source of truth: deleting rows only makes loads slower.
--
-- `state_version` is the shape of the aggregate's state the snapshot was written in; the
-- engine ignores a snapshot of another shape and folds the stream from its first event.
-- `event_hash` is the hash of the event at `version`: a snapshot whose stream no longer holds
-- that very event (a restore, a rewritten stream) is ignored too.
CREATE TABLE snapshots (
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    version        bigint      NOT NULL CHECK (version >= 1),
    state_version  integer     NOT NULL,
    state          jsonb       NOT NULL,
    event_hash     bytea       NOT NULL,
    taken_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id)
);

-- Only the writers (the command API and the process manager) read and write snapshots: the
-- states hold every tenant's balances, and the tenants' readers go through the read models.
GRANT SELECT, INSERT, UPDATE ON snapshots TO ledger_writer;
