//! How an append wakes the relays: the one in this process directly, those of other replicas
//! through Postgres `NOTIFY`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use service_kit::db::channels;
use sqlx::PgPool;
use tokio::sync::Notify;

/// Shortest pause between two `NOTIFY`s from one process.
const NOTIFY_INTERVAL: Duration = Duration::from_millis(5);

/// Wakes relays after an append: the one in this process directly, those of other replicas
/// through `NOTIFY`, sent off the request path, coalesced (one pending notification stands for
/// any number of appends) and at most every [`NOTIFY_INTERVAL`], so that a busy command API does
/// not double its transaction rate.
#[derive(Debug, Clone, Default)]
pub struct AppendSignal {
    local: Arc<Notify>,
    remote: Arc<Notify>,
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

    /// Forwards appends to `NOTIFY` until `shutdown`.
    pub(crate) async fn forward(self, pool: PgPool, shutdown: impl Future<Output = ()> + Send) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                () = self.remote.notified() => {}
            }
            if let Err(err) = sqlx::query("SELECT pg_notify($1, '')")
                .bind(channels::EVENTS_APPENDED)
                .execute(&pool)
                .await
            {
                tracing::debug!(error = %err, "could not notify other relays");
            }
            tokio::time::sleep(NOTIFY_INTERVAL).await;
        }
    }
}
