//! Rebuilding the read models from the event store (not Kafka, whose retention is finite).
//!
//! The event store is folded into fresh tables while the live ones keep serving. Then, in one
//! transaction that locks the live tables (pausing readers and the projector for a moment),
//! the events committed since are folded in too and the tables are swapped by renaming. The
//! projector, resuming, skips what the new tables already hold by version.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use service_kit::event_log::{self, EVENT_COLUMNS, LogPosition, LoggedEvent};
use service_kit::progress::Progress;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::model::{self, AccountRow, EntryRow};
use crate::store::{self, StoredEventError, Tables};

/// Events read per query.
const BATCH: i64 = 20_000;
/// Rows written per statement.
const WRITE_CHUNK: usize = 10_000;

/// What a rebuild did.
#[derive(Debug, Clone, Copy)]
pub struct RebuildReport {
    pub events: u64,
    pub accounts: usize,
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error(transparent)]
    Stored(#[from] StoredEventError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("the event store does not fold: {0}")]
    Fold(#[from] model::FoldError),
}

/// The read models folded from events in memory: rows by account, and the entries produced
/// since they were last taken.
#[derive(Default)]
pub(crate) struct Fold {
    pub(crate) rows: HashMap<Uuid, AccountRow>,
    pub(crate) entries: Vec<EntryRow>,
    pub(crate) events: u64,
}

impl Fold {
    pub(crate) fn apply(&mut self, event: &LoggedEvent) -> Result<(), RebuildError> {
        if event.aggregate_type != "account" {
            return Ok(());
        }
        let (account, decoded) = store::decode(event)?;
        let mut row = self.rows.remove(&account);
        let applied = model::apply(&mut row, account, event, &decoded, &mut self.entries);
        if let Some(row) = row {
            self.rows.insert(account, row);
        }
        applied?;
        self.events += 1;
        Ok(())
    }

    async fn flush_entries(&mut self, connection: &mut PgConnection) -> Result<(), sqlx::Error> {
        store::copy_entries(connection, Tables::REBUILD, &self.entries).await?;
        self.entries.clear();
        Ok(())
    }
}

/// Rebuilds `accounts` and `account_entries`. `show_progress` draws a progress line on stderr
/// when it is a terminal.
pub async fn rebuild(pool: &PgPool, show_progress: bool) -> Result<RebuildReport, RebuildError> {
    let started = Instant::now();
    let total: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'account'")
            .fetch_one(pool)
            .await?;
    let progress = Progress::new("events", total as u64, show_progress);
    let mut connection = pool.acquire().await?;
    sqlx::raw_sql(
        "DROP TABLE IF EXISTS accounts_rebuild, account_entries_rebuild;
         CREATE TABLE accounts_rebuild (LIKE accounts INCLUDING ALL);
         CREATE TABLE account_entries_rebuild (LIKE account_entries INCLUDING ALL);",
    )
    .execute(&mut *connection)
    .await?;

    let mut fold = Fold::default();
    // Reading the next batch overlaps folding and writing this one.
    let (batches, mut received) = tokio::sync::mpsc::channel(2);
    let reader = tokio::spawn({
        let pool = pool.clone();
        async move {
            let mut position = LogPosition::START;
            loop {
                let batch = event_log::read_committed(&pool, position, BATCH).await?;
                let Some(last) = batch.last().map(|event| event.position) else {
                    return Ok::<_, sqlx::Error>(position);
                };
                position = last;
                if batches.send(batch).await.is_err() {
                    return Ok(position);
                }
            }
        }
    });
    while let Some(batch) = received.recv().await {
        for event in &batch {
            fold.apply(event)?;
        }
        fold.flush_entries(&mut connection).await?;
        progress.update(fold.events);
    }
    let position = reader
        .await
        .map_err(|err| sqlx::Error::Io(std::io::Error::other(err)))??;

    let mut tx = pool.begin().await?;
    sqlx::query("LOCK TABLE accounts, account_entries IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    // Under the lock, everything committed is visible and nothing new can be projected, so
    // this pass needs no horizon: it takes every event the first pass had not reached.
    let rest = events_after(&mut tx, position).await?;
    for event in &rest {
        fold.apply(event)?;
    }
    fold.flush_entries(&mut tx).await?;
    let rows: Vec<&AccountRow> = fold.rows.values().collect();
    for chunk in rows.chunks(WRITE_CHUNK) {
        store::save(&mut tx, Tables::REBUILD, chunk, &[]).await?;
    }
    sqlx::raw_sql(
        "ALTER TABLE accounts RENAME TO accounts_retired;
         ALTER TABLE account_entries RENAME TO account_entries_retired;
         ALTER TABLE accounts_rebuild RENAME TO accounts;
         ALTER TABLE account_entries_rebuild RENAME TO account_entries;
         DROP TABLE accounts_retired, account_entries_retired;
         SELECT ledger_protect_read_models();
         -- Every stream was just folded whole, so none is parked any more.
         DELETE FROM projector_parked_streams;",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    progress.finish(fold.events);
    Ok(RebuildReport {
        events: fold.events,
        accounts: fold.rows.len(),
        elapsed: started.elapsed(),
    })
}

/// Every committed event after `position`, ordered by stream.
async fn events_after(
    connection: &mut PgConnection,
    position: LogPosition,
) -> Result<Vec<LoggedEvent>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {EVENT_COLUMNS}
           FROM events
          WHERE (tx_id, global_position) > ($1::text::xid8, $2)
          ORDER BY aggregate_type, aggregate_id, sequence"
    ))
    .bind(position.tx_id.to_string())
    .bind(position.global_position)
    .fetch_all(connection)
    .await
}
