//! `projector check`: every read model compared with a fold of the event store, row by row.
//! Run it once the projector has caught up: a row that is merely behind shows as a difference.

use std::time::{Duration, Instant};

use service_kit::event_log::{self, LogPosition};
use sqlx::PgPool;

pub use crate::projection::Difference;
use crate::projection::{self, Purpose};
use crate::rebuild::{self, BATCH, RebuildError};

#[derive(Debug, Clone)]
pub struct CheckReport {
    /// Rows folded, by read model: ("accounts", n), ("transfers", m).
    pub rows: Vec<(&'static str, usize)>,
    pub events: u64,
    pub differences: Vec<Difference>,
    pub elapsed: Duration,
}

/// Folds every committed event and compares each read model's live rows with the fold.
pub async fn check(pool: &PgPool) -> Result<CheckReport, RebuildError> {
    let started = Instant::now();
    let mut models = projection::read_models(Purpose::Check);
    let mut events = 0;
    let mut position = LogPosition::START;
    loop {
        let batch = event_log::read_committed(pool, position, BATCH)
            .await?
            .events;
        let Some(last) = batch.last() else { break };
        position = last.position;
        for event in &batch {
            rebuild::fold(&mut models, event)?;
        }
        events += batch.len() as u64;
    }
    let mut connection = pool.acquire().await?;
    let mut differences = Vec::new();
    for model in &models {
        differences.extend(model.differences(&mut connection).await?);
    }
    differences.sort_by(|a, b| (a.id, &a.what).cmp(&(b.id, &b.what)));
    Ok(CheckReport {
        rows: models
            .iter()
            .map(|model| (model.name(), model.rows()))
            .collect(),
        events,
        differences,
        elapsed: started.elapsed(),
    })
}
