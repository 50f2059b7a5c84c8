-- The relay reads the log in commit order: (tx_id, global_position), below the snapshot's xmin.
CREATE INDEX events_commit_order ON events (tx_id, global_position);

-- Where each reader of the global log has got to. A reader advances its row only after the
-- events up to it were acknowledged downstream, and only from the position it read (a
-- compare-and-set), so a deposed leader cannot move it.
CREATE TABLE log_checkpoints (
    reader          text        PRIMARY KEY,
    tx_id           xid8        NOT NULL,
    global_position bigint      NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
