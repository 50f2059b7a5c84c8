//! Reading the global event log in commit order, without gaps and without timeouts.
//!
//! Identity values are handed out at insert, not at commit, so ordering by `global_position`
//! alone skips rows whose transaction commits late. Instead (docs/ARCHITECTURE.md):
//!
//! ```sql
//! WHERE (tx_id, global_position) > ($last_tx, $last_pos)
//!   AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
//! ORDER BY tx_id, global_position
//! ```
//!
//! Every row of a transaction below the snapshot's xmin is final, and every row not yet visible
//! belongs to a transaction at or above it, so a position never passes a row that can still
//! appear.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{PgExecutor, PgPool, Row as _};
use uuid::Uuid;

use crate::hash_chain::{ChainedEvent, StoredEvent};

/// A point in the commit-ordered log: after every event at or before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct LogPosition {
    pub tx_id: u64,
    pub global_position: i64,
}

impl LogPosition {
    pub const START: Self = Self {
        tx_id: 0,
        global_position: 0,
    };
}

/// `<tx_id>-<global_position>`: the form a position takes in cursors and on the command line.
impl std::fmt::Display for LogPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.tx_id, self.global_position)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a log position is `<tx_id>-<global_position>`, two non-negative integers")]
pub struct InvalidLogPosition;

impl std::str::FromStr for LogPosition {
    type Err = InvalidLogPosition;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (tx_id, global_position) = text.split_once('-').ok_or(InvalidLogPosition)?;
        Ok(Self {
            tx_id: tx_id.parse().map_err(|_| InvalidLogPosition)?,
            global_position: global_position
                .parse()
                .ok()
                .filter(|position| *position >= 0)
                .ok_or(InvalidLogPosition)?,
        })
    }
}

/// One event as stored, with its place in the log.
#[derive(Debug, Clone)]
pub struct LoggedEvent {
    pub position: LogPosition,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub event_id: Uuid,
    pub recorded_at: DateTime<Utc>,
    /// The tenant the metadata names (the `tenant` column); empty if it names none.
    pub tenant: String,
    /// The stored JSON text.
    pub payload: String,
    pub metadata: String,
    /// The hash-chain link to the stream's previous event (none for the first).
    pub prev_hash: Option<Vec<u8>>,
    pub hash: Vec<u8>,
}

impl LoggedEvent {
    /// The event as the current code reads it, older versions upcast: the one way a stored
    /// event is decoded.
    pub fn decode<E: domain::StoredEvent>(&self) -> Result<E, domain::ReadError> {
        let payload = serde_json::from_str(&self.payload).map_err(|source| {
            domain::ReadError::Unreadable {
                event_type: self.event_type.clone(),
                event_version: self.event_version.clone(),
                source,
            }
        })?;
        domain::read_stored(&self.event_type, &self.event_version, payload)
    }

    /// The fields and links the hash chain covers, for verification.
    pub fn chained(&self) -> StoredEvent<'_> {
        StoredEvent {
            event: ChainedEvent {
                aggregate_type: &self.aggregate_type,
                aggregate_id: &self.aggregate_id,
                sequence: self.sequence,
                event_type: &self.event_type,
                event_version: &self.event_version,
                event_id: self.event_id,
                recorded_at_micros: self.recorded_at.timestamp_micros(),
                payload: &self.payload,
                metadata: &self.metadata,
            },
            prev_hash: self.prev_hash.as_deref(),
            hash: &self.hash,
        }
    }
}

/// The tenant `metadata` names, as the `tenant` column derives it; for events that were not
/// read from the store (an export file).
pub fn tenant_of(metadata: &str) -> String {
    #[derive(serde::Deserialize)]
    struct Tenant {
        tenant: Option<String>,
    }
    serde_json::from_str::<Tenant>(metadata)
        .ok()
        .and_then(|parsed| parsed.tenant)
        .unwrap_or_default()
}

/// The select list [`LoggedEvent`]'s `FromRow` reads, for queries over `events`.
pub const EVENT_COLUMNS: &str = "tx_id::text AS tx_id, global_position, aggregate_type, \
    aggregate_id, sequence, event_type, event_version, event_id, recorded_at, \
    coalesce(tenant, '') AS tenant, payload::text AS payload, metadata::text AS metadata, \
    prev_hash, hash";

impl<'r> sqlx::FromRow<'r, PgRow> for LoggedEvent {
    fn from_row(row: &'r PgRow) -> Result<Self, sqlx::Error> {
        let tx_id: &str = row.try_get("tx_id")?;
        Ok(Self {
            position: LogPosition {
                tx_id: tx_id.parse().map_err(|err| sqlx::Error::ColumnDecode {
                    index: "tx_id".into(),
                    source: Box::new(err),
                })?,
                global_position: row.try_get("global_position")?,
            },
            aggregate_type: row.try_get("aggregate_type")?,
            aggregate_id: row.try_get("aggregate_id")?,
            sequence: row.try_get("sequence")?,
            event_type: row.try_get("event_type")?,
            event_version: row.try_get("event_version")?,
            event_id: row.try_get("event_id")?,
            recorded_at: row.try_get("recorded_at")?,
            tenant: row.try_get("tenant")?,
            payload: row.try_get("payload")?,
            metadata: row.try_get("metadata")?,
            prev_hash: row.try_get("prev_hash")?,
            hash: row.try_get("hash")?,
        })
    }
}

/// The rule above, written so that the planner walks the `(tx_id, global_position)` index and
/// stops after `LIMIT` rows: the horizon is applied to that ordered prefix (rows at or past it
/// all come after the rows before it), not inside the scan, where its unknown selectivity made
/// the planner sort everything after the position (240 ms per batch half-way through a million
/// events, against under 1 ms). Of the prefix's rows that are not final only the first is sent,
/// marked so: it tells the reader that something waits behind an open transaction, in the same
/// round trip. The outer `ORDER BY` names `marked.tx_id`: a bare `tx_id` would be the text
/// output column, and sort 10000 before 9999. `$filter` narrows the inner scan (to one tenant,
/// whose index has the same order after the tenant).
macro_rules! read_committed_sql {
    ($filter:literal) => {
        concat!(
            "SELECT tx_id::text AS tx_id, global_position, aggregate_type, aggregate_id, sequence,
                    event_type, event_version, event_id, recorded_at, tenant, payload, metadata,
                    prev_hash, hash, is_final
               FROM (SELECT next.*, next.tx_id < horizon.xmin AS is_final,
                            lag(next.tx_id < horizon.xmin, 1, true)
                              OVER (ORDER BY next.tx_id, next.global_position) AS follows_final
                       FROM (SELECT tx_id, global_position, aggregate_type, aggregate_id, sequence,
                                    event_type, event_version, event_id, recorded_at,
                                    coalesce(tenant, '') AS tenant, payload::text AS payload,
                                    metadata::text AS metadata, prev_hash, hash
                               FROM events
                              WHERE (tx_id, global_position) > ($1::text::xid8, $2) ",
            $filter,
            "
                              ORDER BY tx_id, global_position
                              LIMIT $3) AS next,
                            (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin) AS horizon
                    ) AS marked
              WHERE is_final OR follows_final
              ORDER BY marked.tx_id, marked.global_position"
        )
    };
}

/// What the log holds after a position: the events a reader may take, and whether more wait.
#[derive(Debug, Default)]
pub struct Committed {
    /// Up to the limit asked for, in commit order, all of them final.
    pub events: Vec<LoggedEvent>,
    /// Events after these, among the first `limit` after the position, exist that are not
    /// final yet (an older transaction is still open): a reader should look again soon rather
    /// than wait for a notification. After a full batch it says nothing of what follows.
    pub pending: bool,
}

impl Committed {
    fn from_rows(rows: Vec<(LoggedEvent, bool)>) -> Self {
        let mut committed = Self::default();
        for (event, is_final) in rows {
            if is_final {
                committed.events.push(event);
            } else {
                committed.pending = true;
            }
        }
        committed
    }
}

fn marked_row(row: &PgRow) -> Result<(LoggedEvent, bool), sqlx::Error> {
    Ok((sqlx::FromRow::from_row(row)?, row.try_get("is_final")?))
}

/// Up to `limit` events after `after`, in commit order, all of them final.
pub async fn read_committed(
    executor: impl PgExecutor<'_>,
    after: LogPosition,
    limit: i64,
) -> Result<Committed, sqlx::Error> {
    let rows = sqlx::query(read_committed_sql!(""))
        .bind(after.tx_id.to_string())
        .bind(after.global_position)
        .bind(limit)
        .try_map(|row: PgRow| marked_row(&row))
        .fetch_all(executor)
        .await?;
    Ok(Committed::from_rows(rows))
}

/// As [`read_committed`], but only the events of `tenant`: the tenant's own log, in the same
/// order as the whole log.
pub async fn read_committed_of_tenant(
    executor: impl PgExecutor<'_>,
    tenant: &str,
    after: LogPosition,
    limit: i64,
) -> Result<Committed, sqlx::Error> {
    let rows = sqlx::query(read_committed_sql!("AND tenant = $4"))
        .bind(after.tx_id.to_string())
        .bind(after.global_position)
        .bind(limit)
        .bind(tenant)
        .try_map(|row: PgRow| marked_row(&row))
        .fetch_all(executor)
        .await?;
    Ok(Committed::from_rows(rows))
}

/// How far a reader at `after` is behind the log, for its metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lag {
    /// Positions between `after` and the newest event: the events not read yet, give or take
    /// the positions of rolled-back appends.
    pub events: i64,
    /// Age of the oldest event not read yet; 0 when there is none.
    pub seconds: f64,
    /// Age of the oldest transaction holding an xid: nothing it may still write can be read
    /// until it ends, so a long one delays (never breaks) every reader.
    pub oldest_transaction_seconds: f64,
}

/// Measures [`Lag`] with three index lookups, whatever the length of the log. The newest
/// position is read from the last event in log order (the commit-order index read backwards):
/// `max(global_position)` has no index and scans the table. The two differ only for a moment,
/// while a transaction that took a higher position commits after a newer one.
pub async fn lag(pool: &PgPool, after: LogPosition) -> Result<Lag, sqlx::Error> {
    let (events, seconds, oldest_transaction_seconds): (i64, f64, f64) = sqlx::query_as(
        "SELECT \
           greatest(coalesce((SELECT global_position FROM events \
                              ORDER BY tx_id DESC, global_position DESC LIMIT 1), 0) - $2, 0), \
           coalesce((SELECT extract(epoch FROM now() - recorded_at)::float8 FROM events \
                     WHERE (tx_id, global_position) > ($1::text::xid8, $2) \
                     ORDER BY tx_id, global_position LIMIT 1), 0), \
           coalesce((SELECT extract(epoch FROM now() - min(xact_start))::float8 \
                     FROM pg_stat_activity WHERE backend_xid IS NOT NULL), 0)",
    )
    .bind(after.tx_id.to_string())
    .bind(after.global_position)
    .fetch_one(pool)
    .await?;
    Ok(Lag {
        events,
        seconds,
        oldest_transaction_seconds,
    })
}

/// The saved position of `reader`, or the start of the log.
pub async fn load_checkpoint(
    executor: impl PgExecutor<'_>,
    reader: &str,
) -> Result<LogPosition, sqlx::Error> {
    let row: Option<(String, i64)> = sqlx::query_as(
        "SELECT tx_id::text, global_position FROM log_checkpoints WHERE reader = $1",
    )
    .bind(reader)
    .fetch_optional(executor)
    .await?;
    match row {
        None => Ok(LogPosition::START),
        Some((tx_id, global_position)) => Ok(LogPosition {
            tx_id: tx_id
                .parse()
                .map_err(|err| sqlx::Error::Decode(Box::new(err)))?,
            global_position,
        }),
    }
}

/// Moves `reader` from `from` to `to`. Returns false, changing nothing, if the saved position
/// is no longer `from`: another instance of the reader moved it.
pub async fn advance_checkpoint(
    executor: impl PgExecutor<'_>,
    reader: &str,
    from: LogPosition,
    to: LogPosition,
) -> Result<bool, sqlx::Error> {
    let result = sqlx::query(
        "INSERT INTO log_checkpoints (reader, tx_id, global_position)
         VALUES ($1, $4::text::xid8, $5)
         ON CONFLICT (reader) DO UPDATE
            SET tx_id = EXCLUDED.tx_id, global_position = EXCLUDED.global_position, updated_at = now()
          WHERE log_checkpoints.tx_id = $2::text::xid8
            AND log_checkpoints.global_position = $3",
    )
    .bind(reader)
    .bind(from.tx_id.to_string())
    .bind(from.global_position)
    .bind(to.tx_id.to_string())
    .bind(to.global_position)
    .execute(executor)
    .await?;
    Ok(result.rows_affected() == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_as_text() {
        let position = LogPosition {
            tx_id: 7_000_000_001,
            global_position: 42,
        };
        assert_eq!(position.to_string().parse(), Ok(position));
        for bad in ["", "7", "7-", "-42", "x-1", "1-x", "1--2", "1-2-3"] {
            assert_eq!(bad.parse::<LogPosition>(), Err(InvalidLogPosition), "{bad}");
        }
    }
}
