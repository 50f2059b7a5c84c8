//! Admission of new transfers: refused while too many are in flight.
//!
//! A transfer is accepted with one append and completed by the process manager with four more
//! and two trips through Kafka, so clients can request transfers faster than they can be
//! completed. Left alone, the difference piles up: every transfer waits behind the pile, and
//! end-to-end latency grows without bound. Instead, once `COMMAND_API_MAX_TRANSFERS_IN_FLIGHT`
//! transfers are not final, new ones are refused with 503 and `Retry-After` until the process
//! manager has caught up. The same holds when the process manager is down: the pile stops at
//! the limit, and `ledger_transfers_stuck` says why. A retry of a transfer already accepted
//! (same `Idempotency-Key`) is answered from the event store as usual, full or not.
//!
//! The count comes from `transfers_in_flight`, which the event store's trigger keeps in the
//! appending statement. It is read every [`RECOUNT_EVERY`] in the background, never per
//! request, and counted only up to the limit, so its cost is bounded however large the pile:
//! one request may see a count up to [`RECOUNT_EVERY`] old, so the pile can overshoot the
//! limit by what is accepted in that time.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::PgPool;

/// How often the transfers in flight are counted: often enough that a burst overshoots the
/// limit by a fraction of a second's worth of transfers, rarely enough to cost nothing.
pub(crate) const RECOUNT_EVERY: Duration = Duration::from_millis(100);

/// Whether new transfers are admitted, as of the last count.
#[derive(Debug, Default)]
pub(crate) struct TransferBacklog {
    full: AtomicBool,
}

impl TransferBacklog {
    /// False while `limit` or more transfers were in flight at the last count.
    pub(crate) fn admits(&self) -> bool {
        !self.full.load(Ordering::Relaxed)
    }

    /// Counts the transfers in flight every [`RECOUNT_EVERY`] until `stopped` resolves. A count
    /// that fails leaves the last answer in place: the database being down refuses the
    /// transfers anyway, in their own append.
    pub(crate) async fn keep_counted(
        self: Arc<Self>,
        pool: PgPool,
        limit: usize,
        stopped: impl Future<Output = ()>,
    ) {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let count = async {
            let mut every = tokio::time::interval(RECOUNT_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                match count_up_to(&pool, limit).await {
                    Ok(in_flight) => {
                        metrics::gauge!("ledger_transfers_in_flight").set(in_flight as f64);
                        let full = in_flight >= limit;
                        if self.full.swap(full, Ordering::Relaxed) != full {
                            tracing::info!(in_flight, limit, full, "transfer admission changed");
                        }
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot count the transfers in flight")
                    }
                }
            }
        };
        tokio::select! {
            () = count => {}
            () = stopped => {}
        }
    }
}

/// The transfers not yet final, counted up to `limit`: an index-only scan of at most `limit`
/// entries.
async fn count_up_to(pool: &PgPool, limit: i64) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM transfers_in_flight LIMIT $1) AS in_flight",
    )
    .bind(limit)
    .fetch_one(pool)
    .await
}
