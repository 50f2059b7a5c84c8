-- Transfers as the query API shows them, written only by the projector. Like `accounts`, each
-- row carries the last stream version applied to it.
CREATE TABLE transfers (
    id           uuid        PRIMARY KEY,
    tenant       text        NOT NULL,
    from_account uuid        NOT NULL,
    to_account   uuid        NOT NULL,
    amount       bigint      NOT NULL,
    currency     text        NOT NULL,
    reference    text        NOT NULL,
    -- requested, debited, completed, rejected, refunding, failed
    status       text        NOT NULL,
    -- why it was rejected or failed
    reason       text,
    version      bigint      NOT NULL,
    requested_at timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL
);

-- An account's transfers, either side, by id (ids are UUIDv7: time-ordered).
CREATE INDEX transfers_by_source ON transfers (tenant, from_account, id);
CREATE INDEX transfers_by_destination ON transfers (tenant, to_account, id);

-- The transfer behind a money movement, for entries that come from one.
ALTER TABLE account_entries ADD COLUMN transfer_id uuid;
