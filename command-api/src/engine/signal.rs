//! How an append wakes the relays: the one in this process directly, those of other replicas
//! through Postgres `NOTIFY`.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use service_kit::db::channels;
use sqlx::PgPool;
use tokio::sync::Notify;

/// Shortest pause between two `NOTIFY`s from one process.
const NOTIFY_INTERVAL: Duration = Duration::from_millis(5);

/// Wakes relays after an append: the one in this process directly, those of other replicas
/// through `NOTIFY`, sent off the request path, coalesced (one pending notification stands for
/// any number of appends) and at most every [`NOTIFY_INTERVAL`], so that a busy command API does
/// not double its transaction rate. While this process's relay leads, no `NOTIFY` is sent: only
/// the leader listens (it alone publishes), and it was woken directly.
#[derive(Debug, Clone, Default)]
pub struct AppendSignal {
    local: Arc<Notify>,
    remote: Arc<Notify>,
    local_relay_leads: Arc<AtomicBool>,
}

impl AppendSignal {
    pub(crate) fn appended(&self) {
        self.local.notify_one();
        self.remote.notify_one();
    }

    /// Resolves after the next append in this process (or at once if one is pending).
    pub(crate) async fn appended_here(&self) {
        self.local.notified().await;
    }

    /// Set by this process's relay when its term as leader begins and ends.
    pub(crate) fn set_local_relay_leads(&self, leads: bool) {
        self.local_relay_leads.store(leads, Ordering::Release);
    }

    /// Forwards appends to `NOTIFY` until `shutdown`.
    pub(crate) async fn forward(self, pool: PgPool, shutdown: impl Future<Output = ()> + Send) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                () = self.remote.notified() => {}
            }
            let outcome = if self.local_relay_leads.load(Ordering::Acquire) {
                "skipped"
            } else {
                match sqlx::query("SELECT pg_notify($1, '')")
                    .bind(channels::EVENTS_APPENDED)
                    .execute(&pool)
                    .await
                {
                    Ok(_) => "sent",
                    Err(err) => {
                        tracing::debug!(error = %err, "could not notify other relays");
                        "failed"
                    }
                }
            };
            metrics::counter!("ledger_append_notifications_total", "outcome" => outcome)
                .increment(1);
            tokio::time::sleep(NOTIFY_INTERVAL).await;
        }
    }
}
