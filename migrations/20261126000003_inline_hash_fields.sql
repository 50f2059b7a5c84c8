-- The same hash as before, computed without calling event_hash_field(). A SQL-language
-- function called from a trigger is set up anew in every transaction: its body is read back
-- from the catalog and parsed, nine times per appended event. That was about a third of the
-- database's time per append (measured with perf under `cargo xtask bench commands`).
-- Each field is still a big-endian int4 byte length followed by the field's UTF-8 bytes.
CREATE OR REPLACE FUNCTION events_chain_hash() RETURNS trigger
    LANGUAGE plpgsql AS
$$
DECLARE
    previous bytea;
    recorded_micros text := ((extract(epoch FROM NEW.recorded_at) * 1000000)::bigint)::text;
    sequence_text text := NEW.sequence::text;
    event_id_text text := NEW.event_id::text;
    payload_text text := NEW.payload::text;
    metadata_text text := NEW.metadata::text;
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
        || int4send(octet_length(convert_to(NEW.aggregate_type, 'UTF8'))) || convert_to(NEW.aggregate_type, 'UTF8')
        || int4send(octet_length(convert_to(NEW.aggregate_id, 'UTF8'))) || convert_to(NEW.aggregate_id, 'UTF8')
        || int4send(octet_length(convert_to(sequence_text, 'UTF8'))) || convert_to(sequence_text, 'UTF8')
        || int4send(octet_length(convert_to(NEW.event_type, 'UTF8'))) || convert_to(NEW.event_type, 'UTF8')
        || int4send(octet_length(convert_to(NEW.event_version, 'UTF8'))) || convert_to(NEW.event_version, 'UTF8')
        || int4send(octet_length(convert_to(event_id_text, 'UTF8'))) || convert_to(event_id_text, 'UTF8')
        || int4send(octet_length(convert_to(recorded_micros, 'UTF8'))) || convert_to(recorded_micros, 'UTF8')
        || int4send(octet_length(convert_to(payload_text, 'UTF8'))) || convert_to(payload_text, 'UTF8')
        || int4send(octet_length(convert_to(metadata_text, 'UTF8'))) || convert_to(metadata_text, 'UTF8'));
    RETURN NEW;
END
$$;
