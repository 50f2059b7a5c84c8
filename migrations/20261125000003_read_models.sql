-- Read models, written only by the projector. Each row carries the last stream version
-- applied to it: an event at or below it is a duplicate and skipped.
CREATE TABLE accounts (
    id              uuid        PRIMARY KEY,
    tenant          text        NOT NULL,
    owner           text        NOT NULL,
    currency        text        NOT NULL,
    overdraft_limit bigint      NOT NULL,
    balance         bigint      NOT NULL,
    status          text        NOT NULL,
    version         bigint      NOT NULL,
    opened_at       timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);

-- Keyset pagination within a tenant, optionally by owner or status.
CREATE INDEX accounts_by_tenant ON accounts (tenant, id);
CREATE INDEX accounts_by_owner ON accounts (tenant, owner, id);
CREATE INDEX accounts_by_status ON accounts (tenant, status, id);

-- One row per money movement, with the balance after it.
CREATE TABLE account_entries (
    account_id    uuid        NOT NULL,
    version       bigint      NOT NULL,
    tenant        text        NOT NULL,
    kind          text        NOT NULL,
    amount        bigint      NOT NULL,
    currency      text        NOT NULL,
    balance_after bigint      NOT NULL,
    event_id      uuid        NOT NULL,
    recorded_at   timestamptz NOT NULL,
    PRIMARY KEY (account_id, version)
);
