//! Rebuilding every read model from the event store (not Kafka, whose retention is finite).
//!
//! The event store is folded into fresh tables while the live ones keep serving. Then, in one
//! transaction that locks the live tables (pausing readers and the projector for a moment),
//! the events committed since are folded in too and the tables are swapped by renaming. The
//! projector, resuming, skips what the new tables already hold by version.

use std::time::{Duration, Instant};

use service_kit::event_log::{self, EVENT_COLUMNS, LogPosition, LoggedEvent};
use service_kit::progress::Progress;
use sqlx::{PgConnection, PgPool};

use crate::model;
use crate::projection::{self, Purpose, ReadModel};
use crate::store::StoredEventError;

/// Events read per query.
pub(crate) const BATCH: i64 = 20_000;

/// What a rebuild did.
#[derive(Debug, Clone)]
pub struct RebuildReport {
    pub events: u64,
    /// Rows rebuilt, by read model: ("accounts", n), ("transfers", m).
    pub rows: Vec<(&'static str, usize)>,
    pub elapsed: Duration,
}

impl RebuildReport {
    /// The rows rebuilt of read model `name`.
    pub fn rows_of(&self, name: &str) -> usize {
        self.rows
            .iter()
            .find(|(model, _)| *model == name)
            .map_or(0, |(_, rows)| *rows)
    }
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

/// Folds `event` into every read model.
pub(crate) fn fold(
    models: &mut [Box<dyn ReadModel>],
    event: &LoggedEvent,
) -> Result<(), RebuildError> {
    for model in models.iter_mut() {
        model.fold(event)?;
    }
    Ok(())
}

/// Rebuilds every read model (see [`projection::read_models`]). `show_progress` draws a
/// progress line on stderr when it is a terminal.
pub async fn rebuild(pool: &PgPool, show_progress: bool) -> Result<RebuildReport, RebuildError> {
    let started = Instant::now();
    let mut models = projection::read_models(Purpose::Rebuild);
    let tables: Vec<&str> = models
        .iter()
        .flat_map(|model| model.tables().iter().copied())
        .collect();
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await?;
    let progress = Progress::new("events", total as u64, show_progress);
    let mut connection = pool.acquire().await?;
    let mut create = String::new();
    for table in &tables {
        create.push_str(&format!(
            "DROP TABLE IF EXISTS {table}_rebuild;
             CREATE TABLE {table}_rebuild (LIKE {table} INCLUDING ALL);"
        ));
    }
    sqlx::raw_sql(&create).execute(&mut *connection).await?;

    let mut events = 0;
    // Reading the next batch overlaps folding and writing this one.
    let (batches, mut received) = tokio::sync::mpsc::channel(2);
    let reader = tokio::spawn({
        let pool = pool.clone();
        async move {
            let mut position = LogPosition::START;
            loop {
                let batch = event_log::read_committed(&pool, position, BATCH)
                    .await?
                    .events;
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
            fold(&mut models, event)?;
        }
        events += batch.len() as u64;
        for model in models.iter_mut() {
            model.write(&mut connection, false).await?;
        }
        progress.update(events);
    }
    let position = reader
        .await
        .map_err(|err| sqlx::Error::Io(std::io::Error::other(err)))??;

    let mut tx = pool.begin().await?;
    sqlx::query(&format!(
        "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
        tables.join(", ")
    ))
    .execute(&mut *tx)
    .await?;
    // Under the lock, everything committed is visible and nothing new can be projected, so
    // this pass needs no horizon: it takes every event the first pass had not reached.
    let rest = events_after(&mut tx, position).await?;
    for event in &rest {
        fold(&mut models, event)?;
    }
    events += rest.len() as u64;
    for model in models.iter_mut() {
        model.write(&mut tx, true).await?;
    }
    let mut swap = String::new();
    for table in &tables {
        swap.push_str(&format!(
            "ALTER TABLE {table} RENAME TO {table}_retired;
             ALTER TABLE {table}_rebuild RENAME TO {table};
             DROP TABLE {table}_retired;"
        ));
    }
    swap.push_str(
        "SELECT ledger_protect_read_models();
         -- Every stream was just folded whole, so none is parked any more.
         DELETE FROM projector_parked_streams;",
    );
    sqlx::raw_sql(&swap).execute(&mut *tx).await?;
    tx.commit().await?;
    progress.finish(events);
    Ok(RebuildReport {
        events,
        rows: models
            .iter()
            .map(|model| (model.name(), model.rows()))
            .collect(),
        elapsed: started.elapsed(),
    })
}

/// Every committed event after `position`, in log order.
async fn events_after(
    connection: &mut PgConnection,
    position: LogPosition,
) -> Result<Vec<LoggedEvent>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {EVENT_COLUMNS}
           FROM events
          WHERE (tx_id, global_position) > ($1::text::xid8, $2)
          ORDER BY tx_id, global_position"
    ))
    .bind(position.tx_id.to_string())
    .bind(position.global_position)
    .fetch_all(connection)
    .await
}
