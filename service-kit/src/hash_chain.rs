//! The per-stream hash chain of the event log, recomputed in Rust.
//!
//! The database computes each event's hash in a trigger (see the event-store migration); this
//! module computes the same function from the stored fields, so a verifier needs nothing but
//! the raw rows and cannot be fooled by a rewritten trigger.

use sha2::{Digest, Sha256};

/// The fields of one stored event that its hash covers, exactly as stored.
#[derive(Debug, Clone)]
pub struct ChainedEvent<'a> {
    pub aggregate_type: &'a str,
    pub aggregate_id: &'a str,
    pub sequence: i64,
    pub event_type: &'a str,
    pub event_version: &'a str,
    pub event_id: uuid::Uuid,
    /// `recorded_at` in microseconds since the Unix epoch.
    pub recorded_at_micros: i64,
    /// The stored JSON text of the payload.
    pub payload: &'a str,
    /// The stored JSON text of the metadata.
    pub metadata: &'a str,
}

/// `sha256(previous or 32 zero bytes || each field as a big-endian u32 byte length + UTF-8)`.
pub fn event_hash(previous: Option<&[u8]>, event: &ChainedEvent<'_>) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(previous.unwrap_or(&[0u8; 32]));
    let sequence = event.sequence.to_string();
    let event_id = event.event_id.to_string();
    let recorded_at = event.recorded_at_micros.to_string();
    for field in [
        event.aggregate_type,
        event.aggregate_id,
        &sequence,
        event.event_type,
        event.event_version,
        &event_id,
        &recorded_at,
        event.payload,
        event.metadata,
    ] {
        let length = u32::try_from(field.len()).unwrap_or(u32::MAX);
        hasher.update(length.to_be_bytes());
        hasher.update(field.as_bytes());
    }
    hasher.finalize().into()
}

/// Where a stream's chain first fails to hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    pub sequence: i64,
    pub reason: BreakReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakReason {
    /// The sequence does not follow the previous event's (an event was deleted or reordered).
    SequenceGap,
    /// `prev_hash` is not the previous event's hash.
    PreviousHashMismatch,
    /// The stored hash is not the hash of the stored fields (the event was altered).
    HashMismatch,
}

/// One stored row: the chained fields plus the two stored hashes.
#[derive(Debug, Clone)]
pub struct StoredEvent<'a> {
    pub event: ChainedEvent<'a>,
    pub prev_hash: Option<&'a [u8]>,
    pub hash: &'a [u8],
}

/// Checks one stream's rows, in sequence order, and returns the first break.
pub fn verify_stream<'a>(rows: impl IntoIterator<Item = StoredEvent<'a>>) -> Option<ChainBreak> {
    let mut previous: Option<&[u8]> = None;
    for (expected_sequence, row) in (1..).zip(rows) {
        let sequence = row.event.sequence;
        let broken = |reason| Some(ChainBreak { sequence, reason });
        if sequence != expected_sequence {
            return broken(BreakReason::SequenceGap);
        }
        if row.prev_hash != previous {
            return broken(BreakReason::PreviousHashMismatch);
        }
        if event_hash(previous, &row.event).as_slice() != row.hash {
            return broken(BreakReason::HashMismatch);
        }
        previous = Some(row.hash);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(sequence: i64, payload: &str) -> ChainedEvent<'_> {
        ChainedEvent {
            aggregate_type: "account",
            aggregate_id: "a",
            sequence,
            event_type: "X",
            event_version: "1",
            event_id: uuid::Uuid::nil(),
            recorded_at_micros: 1,
            payload,
            metadata: "{}",
        }
    }

    #[test]
    fn field_boundaries_are_unambiguous() {
        let mut a = event(1, "ab");
        a.metadata = "c";
        let mut b = event(1, "a");
        b.metadata = "bc";
        assert_ne!(event_hash(None, &a), event_hash(None, &b));
    }

    #[test]
    fn finds_the_first_altered_event() {
        let first = event_hash(None, &event(1, "{}"));
        let second = event_hash(Some(&first), &event(2, "{}"));
        let rows = |payload_two| {
            vec![
                StoredEvent {
                    event: event(1, "{}"),
                    prev_hash: None,
                    hash: &first,
                },
                StoredEvent {
                    event: event(2, payload_two),
                    prev_hash: Some(&first),
                    hash: &second,
                },
            ]
        };
        assert_eq!(verify_stream(rows("{}")), None);
        assert_eq!(
            verify_stream(rows("{\"x\":1}")),
            Some(ChainBreak {
                sequence: 2,
                reason: BreakReason::HashMismatch
            })
        );
    }
}
