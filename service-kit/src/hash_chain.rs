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
    /// The version at which the chain fails: the missing one for a gap, else the first row
    /// that does not hold.
    pub sequence: i64,
    pub reason: BreakReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakReason {
    /// The expected version is not there (an event was deleted or renumbered).
    SequenceGap,
    /// `prev_hash` is not the previous event's hash (the previous event was altered and its
    /// hash recomputed, or this one was moved).
    PreviousHashMismatch,
    /// The stored hash is not the hash of the stored fields (the event was altered).
    HashMismatch,
}

impl BreakReason {
    /// A stable, kebab-case name for reports and APIs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SequenceGap => "sequence-gap",
            Self::PreviousHashMismatch => "previous-hash-mismatch",
            Self::HashMismatch => "hash-mismatch",
        }
    }
}

impl ChainBreak {
    /// What an auditor should read about this break.
    pub fn explain(&self) -> String {
        let version = self.sequence;
        match self.reason {
            BreakReason::SequenceGap => {
                format!("version {version} is missing: an event was deleted or renumbered")
            }
            BreakReason::PreviousHashMismatch => format!(
                "version {version} does not link to version {}: one of the two was altered and rehashed, or moved",
                version - 1
            ),
            BreakReason::HashMismatch => format!(
                "the stored fields of version {version} do not hash to its stored hash: the event was altered"
            ),
        }
    }
}

/// One stored row: the chained fields plus the two stored hashes.
#[derive(Debug, Clone)]
pub struct StoredEvent<'a> {
    pub event: ChainedEvent<'a>,
    pub prev_hash: Option<&'a [u8]>,
    pub hash: &'a [u8],
}

/// Checks one stream's rows one at a time, in sequence order, holding only the last link.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    next_sequence: i64,
    previous: Option<[u8; 32]>,
    /// False when the previous link was not a 32-byte hash: the next `prev_hash` cannot match.
    previous_well_formed: bool,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        Self::new()
    }
}

impl ChainVerifier {
    /// For a whole stream, from version 1.
    pub fn new() -> Self {
        Self {
            next_sequence: 1,
            previous: None,
            previous_well_formed: true,
        }
    }

    /// For a stream's suffix that starts at `first_sequence` and claims to follow
    /// `prev_hash`, e.g. an export of a time range: the suffix is checked against that anchor.
    pub fn resume(first_sequence: i64, prev_hash: Option<&[u8]>) -> Self {
        let previous = prev_hash.and_then(|hash| <[u8; 32]>::try_from(hash).ok());
        Self {
            next_sequence: first_sequence,
            previous,
            previous_well_formed: prev_hash.is_none() || previous.is_some(),
        }
    }

    /// Checks the next row; after an `Err` the verifier should be dropped.
    pub fn check(&mut self, row: &StoredEvent<'_>) -> Result<(), ChainBreak> {
        let sequence = row.event.sequence;
        let broken = |sequence, reason| Err(ChainBreak { sequence, reason });
        if sequence != self.next_sequence {
            return broken(self.next_sequence.min(sequence), BreakReason::SequenceGap);
        }
        if !self.previous_well_formed || row.prev_hash != self.previous.as_ref().map(|h| &h[..]) {
            return broken(sequence, BreakReason::PreviousHashMismatch);
        }
        let hash = event_hash(self.previous.as_ref().map(|h| &h[..]), &row.event);
        if hash.as_slice() != row.hash {
            return broken(sequence, BreakReason::HashMismatch);
        }
        self.previous = Some(hash);
        self.next_sequence += 1;
        Ok(())
    }

    /// The version the next row must have.
    pub fn next_sequence(&self) -> i64 {
        self.next_sequence
    }

    /// The last verified link, if any.
    pub fn head(&self) -> Option<&[u8; 32]> {
        self.previous.as_ref()
    }
}

/// Checks one stream's rows, in sequence order from version 1, and returns the first break.
pub fn verify_stream<'a>(rows: impl IntoIterator<Item = StoredEvent<'a>>) -> Option<ChainBreak> {
    let mut verifier = ChainVerifier::new();
    rows.into_iter().find_map(|row| verifier.check(&row).err())
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
        let mut suffix = ChainVerifier::resume(2, Some(&first));
        assert_eq!(suffix.check(&rows("{}")[1]), Ok(()));
        let mut wrong_anchor = ChainVerifier::resume(2, Some(&second));
        assert_eq!(
            wrong_anchor.check(&rows("{}")[1]),
            Err(ChainBreak {
                sequence: 2,
                reason: BreakReason::PreviousHashMismatch
            })
        );
        assert_eq!(
            verify_stream(rows("{}").into_iter().skip(1)),
            Some(ChainBreak {
                sequence: 1,
                reason: BreakReason::SequenceGap
            })
        );
        assert_eq!(
            verify_stream(rows("{\"x\":1}")),
            Some(ChainBreak {
                sequence: 2,
                reason: BreakReason::HashMismatch
            })
        );
    }
}
