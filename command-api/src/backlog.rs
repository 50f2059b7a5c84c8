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
//! The pile is shared by every tenant, so one tenant requesting transfers as fast as it can
//! would fill it and have everyone else's refused. A tenant that holds
//! `COMMAND_API_MAX_TRANSFERS_IN_FLIGHT_PER_TENANT` of them is refused on its own, while the
//! others are admitted.
//!
//! The counts come from `transfers_in_flight`, which the event store's trigger keeps in the
//! appending statement. They are read every [`RECOUNT_EVERY`] in the background, never per
//! request, and only up to the limit, so their cost is bounded however large the pile: one
//! request may see counts up to [`RECOUNT_EVERY`] old, so the pile can overshoot a limit by
//! what is accepted in that time.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sqlx::PgPool;

/// How often the transfers in flight are counted: often enough that a burst overshoots the
/// limit by a fraction of a second's worth of transfers, rarely enough to cost nothing.
pub(crate) const RECOUNT_EVERY: Duration = Duration::from_millis(100);

/// How many transfers may be in flight: in all, and of one tenant.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) total: usize,
    pub(crate) per_tenant: usize,
}

/// Whether new transfers are admitted, as of the last count.
#[derive(Debug, Default)]
pub(crate) struct TransferBacklog {
    full: AtomicBool,
    /// The tenants holding their share of the pile.
    tenants_at_limit: RwLock<HashSet<String>>,
}

impl TransferBacklog {
    /// False while the pile, or `tenant`'s part of it, was at its limit at the last count.
    pub(crate) fn admits(&self, tenant: &str) -> bool {
        !self.full.load(Ordering::Relaxed)
            && !self
                .tenants_at_limit
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .contains(tenant)
    }

    /// Counts the transfers in flight every [`RECOUNT_EVERY`] until `stopped` resolves. A count
    /// that fails leaves the last answer in place: the database being down refuses the
    /// transfers anyway, in their own append.
    pub(crate) async fn keep_counted(
        self: Arc<Self>,
        pool: PgPool,
        limits: Limits,
        stopped: impl Future<Output = ()>,
    ) {
        let total = i64::try_from(limits.total).unwrap_or(i64::MAX);
        let per_tenant = i64::try_from(limits.per_tenant).unwrap_or(i64::MAX);
        let count = async {
            let mut every = tokio::time::interval(RECOUNT_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                match count_by_tenant_up_to(&pool, total).await {
                    Ok(by_tenant) => {
                        let in_flight: i64 = by_tenant.iter().map(|(_, count)| count).sum();
                        metrics::gauge!("ledger_transfers_in_flight").set(in_flight as f64);
                        let full = in_flight >= total;
                        if self.full.swap(full, Ordering::Relaxed) != full {
                            tracing::info!(
                                in_flight,
                                limit = total,
                                full,
                                "transfer admission changed"
                            );
                        }
                        let at_limit: HashSet<String> = by_tenant
                            .into_iter()
                            .filter(|(_, count)| *count >= per_tenant)
                            .map(|(tenant, _)| tenant)
                            .collect();
                        *self
                            .tenants_at_limit
                            .write()
                            .unwrap_or_else(|poisoned| poisoned.into_inner()) = at_limit;
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

/// The transfers not yet final by tenant, counted up to `limit` in all: a scan of at most
/// `limit` rows. Past it every tenant is refused, so the split of the rest does not matter.
async fn count_by_tenant_up_to(
    pool: &PgPool,
    limit: i64,
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT tenant, count(*) FROM (SELECT tenant FROM transfers_in_flight LIMIT $1) AS in_flight
          GROUP BY tenant",
    )
    .bind(limit)
    .fetch_all(pool)
    .await
}
