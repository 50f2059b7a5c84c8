//! Every account's state as of an instant, replayed from the event store.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use domain::Account;
use futures::TryStreamExt;
use service_kit::event_log::{EVENT_COLUMNS, LoggedEvent};
use service_kit::progress::Progress;
use sqlx::PgPool;

use crate::ACCOUNT;
use crate::state::{self, StateError};

/// An account as of the replay's instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    pub account_id: String,
    pub version: i64,
    pub account: Account,
}

#[derive(Debug, Clone)]
pub struct ReplayReport {
    /// Accounts that existed at the instant, by id.
    pub accounts: Vec<Replayed>,
    pub events: u64,
    pub elapsed: Duration,
}

/// Folds every account stream (of `tenant`, if given) as of `until`, with the rule of
/// [`state::AsOf::Instant`]: the longest run of versions from 1 all recorded by then.
pub async fn replay(
    pool: &PgPool,
    until: DateTime<Utc>,
    tenant: Option<&str>,
    show_progress: bool,
) -> Result<ReplayReport, StateError> {
    let started = Instant::now();
    let filter = "aggregate_type = $1 AND recorded_at <= $2
                  AND ($3::text IS NULL OR tenant = $3)";
    let total: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM events WHERE {filter}"))
        .bind(ACCOUNT)
        .bind(until)
        .bind(tenant)
        .fetch_one(pool)
        .await?;
    let progress = Progress::new("events", total as u64, show_progress);
    let query = format!(
        "SELECT {EVENT_COLUMNS}
           FROM events WHERE {filter}
          ORDER BY aggregate_id, sequence"
    );
    let mut rows = sqlx::query_as::<_, LoggedEvent>(&query)
        .bind(ACCOUNT)
        .bind(until)
        .bind(tenant)
        .fetch(pool);
    let mut accounts: Vec<Replayed> = Vec::new();
    let mut events = 0u64;
    let mut read = 0u64;
    while let Some(event) = rows.try_next().await? {
        read += 1;
        if read.is_multiple_of(10_000) {
            progress.update(read);
        }
        if accounts
            .last()
            .is_none_or(|last| last.account_id != event.aggregate_id)
        {
            accounts.push(Replayed {
                account_id: event.aggregate_id.clone(),
                version: 0,
                account: Account::default(),
            });
        }
        let Some(current) = accounts.last_mut() else {
            continue;
        };
        // Past a version that was not recorded in time, the stream's later events are not
        // part of its state at `until`.
        if event.sequence != current.version + 1 {
            continue;
        }
        current.account.apply(state::account_event(&event)?);
        current.version = event.sequence;
        events += 1;
    }
    progress.finish(read);
    accounts.retain(|replayed| replayed.version > 0);
    Ok(ReplayReport {
        accounts,
        events,
        elapsed: started.elapsed(),
    })
}
