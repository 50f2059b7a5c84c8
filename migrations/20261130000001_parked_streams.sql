-- Account streams the projector stopped at because a stored event cannot be read (an event
-- version this build does not know, a stream that does not fold). One row per stream; the
-- projector removes it once the stream projects past that event. Every other stream keeps
-- projecting meanwhile.
CREATE TABLE projector_parked_streams (
    account_id uuid PRIMARY KEY,
    sequence   bigint      NOT NULL,
    reason     text        NOT NULL,
    parked_at  timestamptz NOT NULL DEFAULT now()
);
