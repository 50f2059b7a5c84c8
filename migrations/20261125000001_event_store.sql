-- The event store. postgres-es names the first seven columns and their primary key, which is
-- the optimistic-concurrency check; every other column has a default so that its INSERTs (and
-- ours, which name the same seven) keep working.
CREATE TABLE events (
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    sequence        bigint      NOT NULL CHECK (sequence >= 1),
    event_type      text        NOT NULL,
    event_version   text        NOT NULL,
    -- json, not jsonb: the text is kept byte for byte, so the hash chain can be recomputed
    -- from what is stored.
    payload         json        NOT NULL,
    metadata        json        NOT NULL,
    event_id        uuid        NOT NULL DEFAULT gen_random_uuid(),
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    -- Handed out at insert, not at commit: readers of the global log order by
    -- (tx_id, global_position) below the snapshot's xmin, never by this alone.
    global_position bigint      GENERATED ALWAYS AS IDENTITY,
    tx_id           xid8        NOT NULL DEFAULT pg_current_xact_id(),
    prev_hash       bytea,
    hash            bytea       NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);

-- An idempotency key is spent by the event it produced, in the same statement: two racing
-- retries cannot both append, and no separate table has to be kept in step with the log.
CREATE UNIQUE INDEX events_idempotency_key
    ON events ((metadata ->> 'tenant'), (metadata ->> 'idempotency_key'))
    WHERE (metadata ->> 'idempotency_key') IS NOT NULL;

-- One length-prefixed field of the hash input: unambiguous whatever the field contains.
CREATE FUNCTION event_hash_field(value text) RETURNS bytea
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN int4send(octet_length(convert_to(value, 'UTF8'))) || convert_to(value, 'UTF8');

-- hash = sha256(prev_hash or 32 zero bytes || the event's fields, each length-prefixed).
-- Computed here so that no writer can skip or forge it; the Rust verifier recomputes the same.
CREATE FUNCTION events_chain_hash() RETURNS trigger
    LANGUAGE plpgsql AS
$$
DECLARE
    previous bytea;
BEGIN
    IF NEW.sequence > 1 THEN
        SELECT hash INTO previous
          FROM events
         WHERE aggregate_type = NEW.aggregate_type
           AND aggregate_id = NEW.aggregate_id
           AND sequence = NEW.sequence - 1;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'event % of stream %/% has no predecessor',
                NEW.sequence, NEW.aggregate_type, NEW.aggregate_id;
        END IF;
    END IF;
    NEW.prev_hash := previous;
    NEW.hash := sha256(
        coalesce(previous, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea)
        || event_hash_field(NEW.aggregate_type)
        || event_hash_field(NEW.aggregate_id)
        || event_hash_field(NEW.sequence::text)
        || event_hash_field(NEW.event_type)
        || event_hash_field(NEW.event_version)
        || event_hash_field(NEW.event_id::text)
        || event_hash_field(((extract(epoch FROM NEW.recorded_at) * 1000000)::bigint)::text)
        || event_hash_field(NEW.payload::text)
        || event_hash_field(NEW.metadata::text));
    RETURN NEW;
END
$$;

CREATE TRIGGER events_chain_hash
    BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION events_chain_hash();

-- The log is append-only. Rewriting it takes a superuser disabling this trigger, and the hash
-- chain still tells.
CREATE FUNCTION events_append_only() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    RAISE EXCEPTION 'events are append-only: % refused', TG_OP;
END
$$;

CREATE TRIGGER events_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_append_only();
